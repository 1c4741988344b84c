"""`jaxinfer train-draft MODEL OUT_DIR`: an EAGLE-style draft head trained on the target's own outputs.

    1. prompts: `prompts.chat_prompts` (questions composed from a topic and a form with a fixed seed; the
       topics: a curated list, then whole words of the target's vocabulary, thousands of them,
       so answers cover many subjects), and held-out questions on topics no training prompt has
       (`heldout_prompts`); a file of your own with --prompts (its first num_heldout held out);
    2. the target answers them greedily on the paged engine (`answer`: waves of `generate_batch`
       prompts, prefilled together, then decode-only steps), so the head learns what the target
       says, not what some corpus says;
    3. one forward pass over each prompt + answer gives the target's hidden state at every
       position (its next-token distribution is the output head applied to it), in batches of
       similar lengths padded to a multiple of 32;
    4. the draft vocabulary: the `draft_vocab_size` tokens the target emitted most often;
    5. optax (AdamW, linear warm-up then cosine decay, global-norm clipping) trains the head
       unrolled for `unroll` draft steps on its own guesses (what it sees when proposing k tokens):
       per step, cross-entropy against the target's distribution over the draft vocabulary plus a
       smooth-L1 pull of its normalised guess towards the target's normalised hidden state; later
       steps weigh `step_decay` less;
    6. every `eval_every` steps, and at the end, the held-out answers are drafted exactly as the
       engine drafts (`eagle.propose`, k = unroll; prompt lookup's drafts where a suffix of
       `SpeculativeConfig.lookup_min` tokens recurs, the engine's default) and walked as its greedy
       verify steps walk them: the mean accepted length per verify step (1 + drafts equal to the
       target's greedy tokens) is shown, beside the head's alone and the mean over every position
       (`acceptance.heldout_acceptance`);
    7. saved with orbax (`eagle.save_head`) beside a JSON of the recipe and the figures.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.model import embed_tokens
from jaxinfer.speculative import SpeculativeConfig, eagle
from jaxinfer.speculative.acceptance import heldout_acceptance
from jaxinfer.speculative.prompts import chat_prompts, heldout_prompts, vocabulary_words

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DraftRecipe:
    """How `train_draft` builds its data and trains. The defaults are the recipe for SmolLM2-135M on
    a 2-core CPU (docs/BENCHMARKS.md has its time and held-out acceptance)."""

    num_prompts: int = 1024  # answered by the target; `num_heldout` of them are held out
    num_heldout: int = 32
    max_tokens: int = 128  # answer length
    generate_batch: int = 64
    draft_vocab_size: int = 8192
    intermediate_size: int | None = None  # the head's MLP width; None: the target's
    steps: int = 1500
    batch_size: int = 256  # positions per optimizer step
    unroll: int = 3  # draft steps trained (the k it is best at)
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    feature_weight: float = 1.0
    step_decay: float = 0.8
    eval_every: int = 250
    seed: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "max_tokens", "generate_batch", "draft_vocab_size", "steps", "batch_size",
                     "unroll", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 1 <= self.num_heldout < self.num_prompts:
            raise ValueError(f"num_heldout must be in [1, num_prompts), got {self.num_heldout}")


@dataclasses.dataclass
class Corpus:
    """Prompt + answer sequences flattened: hidden [M, D] (the target's, pre-norm), tokens [M], the
    starts: positions whose next `unroll` tokens are all answer tokens of the same sequence, and
    sequences [N, 3]: each one's (first position, first answer position, end)."""

    hidden: np.ndarray
    tokens: np.ndarray
    starts: np.ndarray
    sequences: np.ndarray


def _hidden_fn(loaded):
    """jit: tokens [B, T] -> the target's hidden states [B, T, D] (before the final norm)."""
    from flax import nnx

    from jaxinfer.attention import DenseAttentionMeta, DenseKVCache, dense_attend
    from jaxinfer.model import params_for_layer_loop

    cfg = loaded.config
    params = params_for_layer_loop(cfg, loaded.params)

    @jax.jit
    def run(params, tokens):
        B, T = tokens.shape
        cache = DenseKVCache.zeros(num_layers=cfg.num_layers, batch_size=B, max_len=T, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, dtype=jnp.dtype(cfg.dtype))
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        hidden, _ = nnx.merge(loaded.graphdef, params).forward(tokens, positions, cache,
                                                               DenseAttentionMeta(start_pos=jnp.zeros((B,), jnp.int32)),
                                                               dense_attend)
        return hidden.astype(jnp.float32)

    return lambda tokens: run(params, tokens)


def corpus_length(n: int) -> int:
    """The padded length of a hidden-state batch whose longest sequence has n tokens (a multiple of 32)."""
    return -(-n // 32) * 32


def build_corpus(loaded, sequences: Sequence[tuple[list[int], list[int]]], unroll: int, batch: int = 16,
                 progress: bool = True) -> Corpus:
    """sequences: (prompt ids, answer ids) -> their hidden states, in batches of one padded length
    (sorted by length, padded to a multiple of 32: a compile per length bucket, and against powers of
    two a third fewer positions computed for the default recipe's answers)."""
    hidden_fn = _hidden_fn(loaded)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    hs, toks, starts, offset = [None] * len(sequences), [None] * len(sequences), [], 0
    it = range(0, len(order), batch)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="target hidden states", unit="batch")
    for b in it:
        idx = order[b:b + batch]
        seqs = [sequences[i][0] + sequences[i][1] for i in idx]
        T = corpus_length(max(map(len, seqs)))
        arr = np.zeros((batch, T), np.int32)  # one batch size: a compile per length bucket only
        for r, s in enumerate(seqs):
            arr[r, :len(s)] = s
        h = np.asarray(hidden_fn(arr))
        for r, (i, s) in enumerate(zip(idx, seqs)):
            hs[i], toks[i] = h[r, :len(s)], np.asarray(s, np.int32)
    bounds = []
    for prompt, answer in sequences:
        n, p = len(prompt) + len(answer), len(prompt)
        # start t: h_t sampled token t + 1 (an answer token); drafts are tokens t + 2 .. t + 1 + unroll
        starts += range(offset + p - 1, offset + n - 1 - unroll)
        bounds.append((offset, offset + p, offset + n))
        offset += n
    return Corpus(np.concatenate(hs), np.concatenate(toks), np.asarray(starts, np.int64),
                  np.asarray(bounds, np.int64).reshape(-1, 3))


def draft_vocabulary(answers: Sequence[Sequence[int]], size: int, vocab_size: int,
                     always: Sequence[int] = ()) -> tuple[np.ndarray, float]:
    """The `size` tokens the target emitted most often (`always` included), sorted -> (ids, the share
    of answer tokens they cover)."""
    emitted = np.concatenate([np.asarray(a, np.int64) for a in answers] + [np.zeros(0, np.int64)])
    counts = np.bincount(emitted, minlength=vocab_size).astype(np.float64)
    counts[list(always)] = np.inf
    ids = np.sort(np.argsort(-counts, kind="stable")[:min(size, vocab_size)]).astype(np.int32)
    return ids, float(np.isin(emitted, ids).mean()) if len(emitted) else 1.0


def _normalised(x, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def make_loss(cfg, hc: eagle.HeadConfig, recipe: DraftRecipe):
    """loss(params, frozen, hidden [B, 1 + unroll, D], tokens [B, unroll]) -> (loss, per-step top-1
    agreement with the target [unroll])."""

    def loss_fn(params, frozen, hidden, tokens):
        embed = functools.partial(embed_tokens, cfg, frozen["embed"])
        feature, total, agree = hidden[:, 0], 0.0, []
        weights = [recipe.step_decay ** j for j in range(recipe.unroll)]
        for j in range(recipe.unroll):
            feature = eagle.head_step(params, hc, feature, embed(tokens[:, j]))
            logits = eagle.draft_logits(frozen["final_norm"], frozen["lm_head"], hc, feature)
            target = eagle.draft_logits(frozen["final_norm"], frozen["lm_head"], hc, hidden[:, j + 1])
            ce = -jnp.sum(jax.nn.softmax(target) * jax.nn.log_softmax(logits), axis=-1).mean()
            diff = _normalised(feature, hc.rms_norm_eps) - _normalised(hidden[:, j + 1], hc.rms_norm_eps)
            reg = jnp.mean(jnp.where(jnp.abs(diff) < 1, 0.5 * diff * diff, jnp.abs(diff) - 0.5))
            total = total + weights[j] * (ce + recipe.feature_weight * reg)
            agree.append(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(target, -1)))
        return total / sum(weights), jnp.stack(agree)

    return loss_fn


def encode_question(tok, text: str) -> list[int]:
    """A question's prompt ids: a user turn of the tokenizer's chat template (the text as is without one)."""
    if tok.chat_template:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
    return tok.encode(text)


def answer(loaded, prompt_ids: Sequence[list[int]], max_tokens: int, batch: int,
           progress: bool = True) -> list[list[int]]:
    """The target's greedy answers (token ids, EOS included when it stopped there) to `prompt_ids`, on
    the paged engine in waves of `batch` prompts: a wave is prefilled together and then decodes alone,
    so its steps take the decode path (on CPU the native attention kernel) rather than mixed
    prefill + decode steps. Measured on SmolLM2, 128 questions, this 2-core CPU: 211 tokens/s against
    124 for the static-batch `ReferenceGenerator` (`benchmarks/bench_train_data.py`, docs/BENCHMARKS.md)."""
    from jaxinfer.engine import LLMEngine
    from jaxinfer.engine_config import EngineConfig
    from jaxinfer.sampling import SamplingParams

    page_size = 16
    longest_prompt = max(map(len, prompt_ids))
    config = EngineConfig.of(max_num_seqs=batch, max_prefill_seqs=batch, page_size=page_size,
                             max_num_batched_tokens=max(batch, min(4096, batch * longest_prompt)),
                             num_pages=1 + batch * -(-(longest_prompt + max_tokens) // page_size),
                             enable_prefix_caching=False)
    engine = LLMEngine(loaded.config, loaded.graphdef, loaded.params, loaded.tokenizer, config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    answers: dict[int, list[int]] = {}
    waves = range(0, len(prompt_ids), batch)
    if progress:
        from tqdm.auto import tqdm

        waves = tqdm(waves, desc="target answers", unit="wave")
    for b in waves:
        for i in range(b, min(b + batch, len(prompt_ids))):
            engine.add_request(str(i), prompt_ids[i], params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    answers[int(out.request_id)] = list(out.outputs[0].token_ids)
    return [answers[i] for i in range(len(prompt_ids))]


def train_draft(model: str, out_dir: str, recipe: DraftRecipe = DraftRecipe(), *, prompts: Sequence[str] | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Trains and saves a draft head for `model` to `out_dir`; returns the figures it saved."""
    import optax

    from jaxinfer.loader import load_model

    t_start = time.perf_counter()
    loaded = load_model(model, dtype="float32", scan_layers=False, progress=progress)  # unrolled: faster steps
    cfg, tok = loaded.config, loaded.tokenizer
    if prompts is not None:  # the held-out ones: the file's first num_heldout
        texts = list(prompts)
        if len(texts) <= recipe.num_heldout:
            raise ValueError(f"{len(texts)} prompts: need more than num_heldout={recipe.num_heldout}")
    else:  # held out: other topics than any training prompt's
        texts = heldout_prompts(recipe.num_heldout, recipe.seed) + chat_prompts(
            recipe.num_prompts - recipe.num_heldout, recipe.seed, vocabulary_words(tok, cfg.vocab_size))

    prompt_ids = [encode_question(tok, t) for t in texts]
    t0 = time.perf_counter()
    answers = answer(loaded, prompt_ids, recipe.max_tokens, recipe.generate_batch, progress=progress)
    gen_seconds = time.perf_counter() - t0
    num_answer = sum(map(len, answers))
    log(f"target answers: {len(answers)} prompts, {num_answer} tokens in {gen_seconds:.0f} s")

    held = recipe.num_heldout
    train_seqs = list(zip(prompt_ids[held:], answers[held:]))
    held_seqs = list(zip(prompt_ids[:held], answers[:held]))
    token_map, coverage = draft_vocabulary([a for _, a in train_seqs], recipe.draft_vocab_size, cfg.vocab_size,
                                           always=tok.eos_token_ids)
    log(f"draft vocabulary: {len(token_map)} tokens cover {coverage:.1%} of the training answers' tokens")
    t0 = time.perf_counter()
    train = build_corpus(loaded, train_seqs, recipe.unroll, progress=progress)
    held_corpus = build_corpus(loaded, held_seqs, recipe.unroll, progress=False)
    log(f"hidden states: {len(train.tokens)} training positions ({len(train.starts)} starts), "
        f"{len(held_corpus.starts)} held-out starts in {time.perf_counter() - t0:.0f} s")
    if not len(train.starts) or not len(held_corpus.starts):
        raise ValueError("the target's answers are too short to train on: raise max_tokens or give other prompts")

    from jaxinfer.model import embedding_arrays

    hc = eagle.head_config_for(cfg, len(token_map), recipe.intermediate_size)
    hc = dataclasses.replace(hc, dtype="float32")
    frozen = {"embed": embedding_arrays(loaded.params), "final_norm": loaded.params["final_norm"].get_value(),
              "lm_head": eagle.output_rows(cfg, loaded.params, token_map).astype(jnp.float32)}
    params = eagle.init_head(hc, jax.random.key(recipe.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.learning_rate, recipe.warmup_steps,
                                                  max(recipe.steps, recipe.warmup_steps + 1),
                                                  recipe.learning_rate * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(recipe.clip_norm),
                      optax.adamw(schedule, weight_decay=recipe.weight_decay))
    opt_state = opt.init(params)
    loss_fn = make_loss(cfg, hc, recipe)

    @jax.jit
    def step(params, opt_state, frozen, hidden, tokens):  # (frozen an argument: not baked into the graph)
        (loss, agree), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, hidden, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, agree

    def runtime_head(params):
        return eagle.DraftHead(params=params, final_norm=frozen["final_norm"], lm_head=frozen["lm_head"],
                               token_map=jnp.asarray(token_map), config=hc)

    rng = np.random.default_rng(recipe.seed)
    U = recipe.unroll
    engine_default = SpeculativeConfig()  # the held-out walk proposes as the engine's eagle does by default
    lookup = (engine_default.lookup_min, engine_default.prompt_lookup_max)
    history, t0, losses = [], time.perf_counter(), []
    steps = range(1, recipe.steps + 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="training the draft head", unit="step")
    for i in steps:
        s = train.starts[rng.integers(0, len(train.starts), recipe.batch_size)]
        hidden = train.hidden[s[:, None] + np.arange(U + 1)[None]]  # h_t .. h_{t+U}
        tokens = train.tokens[s[:, None] + 1 + np.arange(U)[None]]  # x_{t+1} .. x_{t+U}
        params, opt_state, loss, agree = step(params, opt_state, frozen, hidden, tokens)
        losses.append(float(loss))
        if i % recipe.eval_every == 0 or i == recipe.steps:
            acc = heldout_acceptance(runtime_head(params), cfg, frozen["embed"], held_corpus, U, recipe.max_tokens,
                                     lookup=lookup)
            entry = dict(step=i, loss=float(np.mean(losses[-50:])), top1_agreement=np.asarray(agree).round(3).tolist(),
                         heldout_mean_accepted_length=round(acc.mean_accepted_length, 3),
                         heldout_head_alone=round(acc.head_alone, 3),
                         heldout_acceptance_by_position=[round(a, 3) for a in acc.by_position],
                         heldout_all_positions=round(acc.all_positions, 3), seconds=round(time.perf_counter() - t0, 1))
            history.append(entry)
            log(f"step {i}: loss {entry['loss']:.3f}, held-out mean accepted length {acc.mean_accepted_length:.2f} "
                f"per verify step at k={U} as the engine proposes (the head, or prompt lookup where {lookup[0]}+ "
                f"tokens recur; by position {', '.join(f'{a:.2f}' for a in acc.by_position)}; "
                f"{acc.all_positions:.2f} over every position); the head alone {acc.head_alone:.2f}")
    train_seconds = time.perf_counter() - t0
    final = history[-1]
    info = dict(recipe=dataclasses.asdict(recipe), model=model, num_prompts=len(texts), answer_tokens=num_answer,
                draft_vocab_coverage=round(coverage, 4), generate_seconds=round(gen_seconds, 1),
                train_seconds=round(train_seconds, 1), total_seconds=round(time.perf_counter() - t_start, 1),
                heldout_mean_accepted_length=final["heldout_mean_accepted_length"],
                heldout_acceptance_by_position=final["heldout_acceptance_by_position"],
                heldout_head_alone=final["heldout_head_alone"],
                heldout_all_positions=final["heldout_all_positions"], history=history)
    eagle.save_head(out_dir, hc, jax.device_get(params), token_map, eagle.target_identity(cfg, tok), info)
    log(f"saved the draft head to {out_dir} ({info['total_seconds']:.0f} s in all); use it with "
        f"speculative_config={{\"method\": \"eagle\", \"model\": \"{out_dir}\", \"num_speculative_tokens\": {U}}}")
    return info
