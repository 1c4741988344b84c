"""A draft head's training data (`train.train_draft`): the target's greedy answers to questions and
the hidden states that sampled them, flattened into a `Corpus`.

    answer(loaded, prompt_ids, max_tokens, batch) -> answers             the paged engine, in waves
    answer_with_hidden(...) -> (answers, states)                         and the sampler rows' hidden
                                                                         states, kept as the steps run
    corpus_from_states(sequences, states, unroll) -> Corpus              no second forward pass
    build_corpus(loaded, sequences, unroll) -> Corpus                    a dense forward over each
                                                                         prompt + answer (answers
                                                                         from elsewhere)
    draft_vocabulary(answers, size, vocab_size) -> (ids, coverage)       the tokens the head scores
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def _layout(sequences: Sequence[tuple[list[int], list[int]]], unroll: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + answer sequences flattened -> (training starts, sequences [N, 3]) of a `Corpus`."""
    starts, bounds, offset = [], [], 0
    for prompt, answer in sequences:
        n, p = len(prompt) + len(answer), len(prompt)
        # start t: h_t sampled token t + 1 (an answer token); drafts are tokens t + 2 .. t + 1 + unroll
        starts += range(offset + p - 1, offset + n - 1 - unroll)
        bounds.append((offset, offset + p, offset + n))
        offset += n
    return np.asarray(starts, np.int64), np.asarray(bounds, np.int64).reshape(-1, 3)


def build_corpus(loaded, sequences: Sequence[tuple[list[int], list[int]]], unroll: int, batch: int = 16,
                 progress: bool = True) -> Corpus:
    """sequences: (prompt ids, answer ids) -> their hidden states by a forward pass over each whole
    sequence, in batches of one padded length (sorted by length, padded to a multiple of 32: a
    compile per length bucket, and against powers of two a third fewer positions computed)."""
    hidden_fn = _hidden_fn(loaded)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    hs = [None] * len(sequences)
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
            hs[i] = h[r, :len(s)]
    return Corpus(np.concatenate(hs), np.concatenate([np.asarray(p + a, np.int32) for p, a in sequences]),
                  *_layout(sequences, unroll))


def corpus_from_states(sequences: Sequence[tuple[list[int], list[int]]], states: Sequence[np.ndarray],
                       unroll: int) -> Corpus:
    """sequences: (prompt ids, answer ids), states: each answer's hidden states as `answer_with_hidden`
    captured them ([len(answer), D]: the one that sampled each answer token) -> a Corpus with no
    second pass. Row t of the hidden states is h_t for t from the prompt's last position to the
    answer's second-to-last (every row a training start or a held-out walk reads); the prompt's
    earlier rows and the last token's are zero."""
    D = next((len(h[0]) for h in states if len(h)), 0)
    hs = []
    for (prompt, answer), h in zip(sequences, states):
        if len(h) != len(answer):
            raise ValueError(f"{len(h)} hidden states for an answer of {len(answer)} tokens")
        hs += [np.zeros((len(prompt) - 1, D), np.float32), np.asarray(h, np.float32).reshape(-1, D),
               np.zeros((1, D), np.float32)]
    return Corpus(np.concatenate(hs) if hs else np.zeros((0, D), np.float32),
                  np.concatenate([np.asarray(p + a, np.int32) for p, a in sequences] + [np.zeros(0, np.int32)]),
                  *_layout(sequences, unroll))


def draft_vocabulary(answers: Sequence[Sequence[int]], size: int, vocab_size: int,
                     always: Sequence[int] = ()) -> tuple[np.ndarray, float]:
    """The `size` tokens the target emitted most often (`always` included), sorted -> (ids, the share
    of answer tokens they cover)."""
    emitted = np.concatenate([np.asarray(a, np.int64) for a in answers] + [np.zeros(0, np.int64)])
    counts = np.bincount(emitted, minlength=vocab_size).astype(np.float64)
    counts[list(always)] = np.inf
    ids = np.sort(np.argsort(-counts, kind="stable")[:min(size, vocab_size)]).astype(np.int32)
    return ids, float(np.isin(emitted, ids).mean()) if len(emitted) else 1.0


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
    return _answers(loaded, prompt_ids, max_tokens, batch, progress, keep_hidden=False)[0]


def answer_with_hidden(loaded, prompt_ids: Sequence[list[int]], max_tokens: int, batch: int,
                       progress: bool = True) -> tuple[list[list[int]], list[np.ndarray]]:
    """`answer`'s answers and, for each, the target's hidden states [len(answer), D] (float32, before
    the final norm) that sampled its tokens: the prompt's last position's, then each answer token's
    but the last. They are the rows the engine's sampler reads (`Runner.hidden_sink`), so the head's
    training data costs no second forward pass (`corpus_from_states`; decision 64)."""
    return _answers(loaded, prompt_ids, max_tokens, batch, progress, keep_hidden=True)


def _answers(loaded, prompt_ids, max_tokens: int, batch: int, progress: bool, keep_hidden: bool):
    from jaxinfer.engine import LLMEngine
    from jaxinfer.engine_config import EngineConfig
    from jaxinfer.sampling import SamplingParams

    page_size = 16
    longest_prompt = max(map(len, prompt_ids))
    config = EngineConfig.of(max_num_seqs=batch, max_prefill_seqs=batch, page_size=page_size,
                             max_num_batched_tokens=max(batch, min(4096, batch * longest_prompt)),
                             num_pages=1 + batch * -(-(longest_prompt + max_tokens) // page_size),
                             enable_prefix_caching=False,
                             # hidden states: synchronous steps, where every sampled row is a kept token (an
                             # async step samples once more for a request that just ended, then drops it)
                             async_scheduling=False if keep_hidden else None)
    engine = LLMEngine(loaded.config, loaded.graphdef, loaded.params, loaded.tokenizer, config)
    hidden: dict[str, list[np.ndarray]] = {str(i): [] for i in range(len(prompt_ids))}
    if keep_hidden:  # (a request id is its index: n = 1, so the runner sees the same id)
        engine.runner.hidden_sink = lambda rid, h: hidden[rid].append(h)
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
    ordered = [answers[i] for i in range(len(prompt_ids))]
    if not keep_hidden:
        return ordered, None
    D = loaded.config.hidden_size
    return ordered, [np.asarray(hidden[str(i)], np.float32).reshape(-1, D) for i in range(len(prompt_ids))]
