"""`jaxinfer train-draft MODEL OUT_DIR`: an EAGLE-style draft head trained on the target's own outputs.

    1. prompts: `prompts.chat_prompts` (questions composed from a topic and a form with a fixed seed; the
       topics: a curated list, then whole words of the target's vocabulary, thousands of them,
       so answers cover many subjects), and held-out questions on topics no training prompt has
       (`heldout_prompts`); a file of your own with --prompts (its first num_heldout held out);
    2. the target answers them greedily on the paged engine (`answer_with_hidden`: waves of
       `generate_batch` prompts, prefilled together, then decode-only steps), so the head learns
       what the target says, not what some corpus says;
    3. the hidden states come with the answers: the engine's sampler rows, the target's hidden state
       that sampled each answer token (its next-token distribution is the output head applied to it),
       kept as the steps run (`Runner.hidden_sink`, `corpus_from_states`), and so do the keys and
       values the head's attention reads (the target's cache of its last full-attention layer, read
       from each answer's pages as it finishes) — no second forward pass (`build_corpus` computes
       the same by one, for answers given from elsewhere);
    4. the draft vocabulary: the `draft_vocab_size` tokens the target emitted most often;
    5. optax (AdamW, linear warm-up then cosine decay, global-norm clipping) trains the head
       unrolled for `unroll` draft steps on its own guesses (what it sees when proposing k tokens;
       with `context_window`, attending over the window of cached positions up to each start):
       per step, cross-entropy against the target's distribution over the draft vocabulary plus a
       smooth-L1 pull of its normalised guess towards the target's normalised hidden state; later
       steps weigh `step_decay` less;
    6. every `eval_every` steps, and at the end, the held-out answers are drafted exactly as the
       engine drafts (`eagle.propose`, k = unroll; prompt lookup's drafts where a suffix of
       `SpeculativeConfig.lookup_min` tokens recurs, and the head stored as the engine stores it on
       this platform: int8 on CPU, `SpeculativeConfig.quantization`) and walked as its greedy
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

from jaxinfer.model import embed_tokens, rope_frequencies
from jaxinfer.speculative import SpeculativeConfig, eagle
from jaxinfer.speculative.acceptance import heldout_acceptance
from jaxinfer.speculative.corpus import (answer_with_hidden, context_at, corpus_from_states, draft_vocabulary,
                                        encode_question)
from jaxinfer.speculative.prompts import chat_prompts, heldout_prompts, vocabulary_words

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DraftRecipe:
    """How `train_draft` builds its data and trains. The defaults are the recipe for SmolLM2-135M on
    a 2-core CPU (docs/BENCHMARKS.md has its time and held-out acceptance)."""

    num_prompts: int = 2304  # answered by the target; `num_heldout` of them are held out
    num_heldout: int = 32
    max_tokens: int = 128  # answer length
    generate_batch: int = 64
    draft_vocab_size: int = 8192
    intermediate_size: int | None = None  # the head's MLP width; None: the target's
    context_window: int | None = 64  # positions of the target's cache the head attends over (None: no attention)
    steps: int = 2000
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
        if self.context_window is not None and (not isinstance(self.context_window, int) or self.context_window < 1):
            raise ValueError(f"context_window must be a positive integer or None, got {self.context_window!r}")
        for name in ("num_prompts", "max_tokens", "generate_batch", "draft_vocab_size", "steps", "batch_size",
                     "unroll", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 1 <= self.num_heldout < self.num_prompts:
            raise ValueError(f"num_heldout must be in [1, num_prompts), got {self.num_heldout}")


def _normalised(x, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def make_loss(cfg, hc: eagle.HeadConfig, recipe: DraftRecipe):
    """loss(params, frozen, hidden [B, 1 + unroll, D], tokens [B, unroll], context) -> (loss, per-step
    top-1 agreement with the target [unroll]); `context`: what a head with attention reads (None: none)."""

    def loss_fn(params, frozen, hidden, tokens, context=None):
        embed = functools.partial(embed_tokens, cfg, frozen["embed"])
        feature, total, agree = hidden[:, 0], 0.0, []
        weights = [recipe.step_decay ** j for j in range(recipe.unroll)]
        for j in range(recipe.unroll):
            feature = eagle.head_step(params, hc, feature, embed(tokens[:, j]), context, j)
            logits = eagle.draft_logits(frozen["final_norm"], frozen["lm_head"], hc, feature)
            target = eagle.draft_logits(frozen["final_norm"], frozen["lm_head"], hc, hidden[:, j + 1])
            ce = -jnp.sum(jax.nn.softmax(target) * jax.nn.log_softmax(logits), axis=-1).mean()
            diff = _normalised(feature, hc.rms_norm_eps) - _normalised(hidden[:, j + 1], hc.rms_norm_eps)
            reg = jnp.mean(jnp.where(jnp.abs(diff) < 1, 0.5 * diff * diff, jnp.abs(diff) - 0.5))
            total = total + weights[j] * (ce + recipe.feature_weight * reg)
            agree.append(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(target, -1)))
        return total / sum(weights), jnp.stack(agree)

    return loss_fn


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
    context_layer = eagle.context_layer_for(cfg) if recipe.context_window else None
    t0 = time.perf_counter()
    answers, states, caches = answer_with_hidden(loaded, prompt_ids, recipe.max_tokens, recipe.generate_batch,
                                                 progress=progress, context_layer=context_layer)
    gen_seconds = time.perf_counter() - t0
    num_answer = sum(map(len, answers))
    log(f"target answers: {len(answers)} prompts, {num_answer} tokens in {gen_seconds:.0f} s")

    held = recipe.num_heldout
    train_seqs = list(zip(prompt_ids[held:], answers[held:]))
    held_seqs = list(zip(prompt_ids[:held], answers[:held]))
    token_map, coverage = draft_vocabulary([a for _, a in train_seqs], recipe.draft_vocab_size, cfg.vocab_size,
                                           always=tok.eos_token_ids)
    log(f"draft vocabulary: {len(token_map)} tokens cover {coverage:.1%} of the training answers' tokens")
    train = corpus_from_states(train_seqs, states[held:], recipe.unroll, None if caches is None else caches[held:])
    held_corpus = corpus_from_states(held_seqs, states[:held], recipe.unroll, None if caches is None else caches[:held])
    del states, caches
    log(f"hidden states (the answers' own): {len(train.starts)} training starts, {len(held_corpus.starts)} held out")
    if not len(train.starts) or not len(held_corpus.starts):
        raise ValueError("the target's answers are too short to train on: raise max_tokens or give other prompts")

    from jaxinfer.model import embedding_arrays

    hc = eagle.head_config_for(cfg, len(token_map), recipe.intermediate_size, recipe.context_window)
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
    def step(params, opt_state, frozen, hidden, tokens, context):  # (frozen an argument: not baked into the graph)
        (loss, agree), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, hidden, tokens, context)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, agree

    # the held-out walk proposes as the engine's eagle does by default here: prompt lookup where a
    # suffix recurs, the head stored as the engine stores it ("auto": int8 on CPU)
    engine_default = SpeculativeConfig(method="eagle", model=out_dir).resolve(jax.default_backend())
    lookup, stored = (engine_default.lookup_min, engine_default.prompt_lookup_max), engine_default.quantization

    def runtime_head(params):
        head = eagle.DraftHead(params=params, final_norm=frozen["final_norm"], lm_head=frozen["lm_head"],
                               token_map=jnp.asarray(token_map), config=hc)
        return eagle.quantize_head(head, stored) if stored else head

    rng = np.random.default_rng(recipe.seed)
    U, inv_freq = recipe.unroll, rope_frequencies(cfg)
    history, t0, losses = [], time.perf_counter(), []
    steps = range(1, recipe.steps + 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="training the draft head", unit="step")
    for i in steps:
        s = train.starts[rng.integers(0, len(train.starts), recipe.batch_size)]
        hidden = train.hidden[s[:, None] + np.arange(U + 1)[None]]  # h_t .. h_{t+U}
        tokens = train.tokens[s[:, None] + 1 + np.arange(U)[None]]  # x_{t+1} .. x_{t+U}
        context = context_at(train, s, hc.context_window, inv_freq) if hc.context_window else None
        params, opt_state, loss, agree = step(params, opt_state, frozen, hidden, tokens, context)
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
                heldout_all_positions=final["heldout_all_positions"], heldout_head_stored=stored or "float32",
                history=history)
    eagle.save_head(out_dir, hc, jax.device_get(params), token_map, eagle.target_identity(cfg, tok), info)
    log(f"saved the draft head to {out_dir} ({info['total_seconds']:.0f} s in all); use it with "
        f"speculative_config={{\"method\": \"eagle\", \"model\": \"{out_dir}\", \"num_speculative_tokens\": {U}}}")
    return info
