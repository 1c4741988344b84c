"""A draft head's training data (`train.train_draft`): the target's greedy answers to questions and
the hidden states that sampled them, flattened into a `Corpus`.

    answer(loaded, prompt_ids, max_tokens, batch) -> answers             the paged engine, in waves
    answer_with_hidden(...) -> (answers, states, caches)                 and the sampler rows' hidden
                                                                         states, kept as the steps run
                                                                         (with context_layer: that
                                                                         layer's cached keys / values)
    corpus_from_states(sequences, states, unroll, caches) -> Corpus      no second forward pass
    build_corpus(loaded, sequences, unroll) -> Corpus                    a dense forward over each
                                                                         prompt + answer (answers
                                                                         from elsewhere)
    draft_vocabulary(answers, size, vocab_size) -> (ids, coverage)       the tokens the head scores
    context_at(corpus, starts, window, inv_freq) -> eagle.Context        what a head's attention reads
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
    sequences [N, 3]: each one's (first position, first answer position, end). For a head with
    attention, keys / values [M, K, H]: the target's cache of the head's context layer at each
    position (as the paged cache holds them: RoPE applied), else None."""

    hidden: np.ndarray
    tokens: np.ndarray
    starts: np.ndarray
    sequences: np.ndarray
    keys: np.ndarray | None = None
    values: np.ndarray | None = None


def context_at(corpus: Corpus, starts: np.ndarray, window: int, inv_freq):
    """The `eagle.Context` of a head's drafts at positions `starts` (h_t's): each one's `window`
    cached positions up to t, those before its sequence's first masked."""
    from jaxinfer.speculative.eagle import Context

    first = np.repeat(corpus.sequences[:, 0], corpus.sequences[:, 2] - corpus.sequences[:, 0])
    idx = starts[:, None] - window + 1 + np.arange(window)[None]
    valid = idx >= first[starts][:, None]
    idx = np.maximum(idx, 0)
    return Context(corpus.keys[idx], corpus.values[idx], valid, (starts - first[starts]).astype(np.int32),
                   np.asarray(inv_freq, np.float32))


def _hidden_fn(loaded, context_layer: int | None = None):
    """jit: tokens [B, T] -> the target's hidden states [B, T, D] (before the final norm) and, with
    `context_layer`, that layer's cached keys and values [B, T, K, H] (else None)."""
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
        hidden, cache = nnx.merge(loaded.graphdef, params).forward(
            tokens, positions, cache, DenseAttentionMeta(start_pos=jnp.zeros((B,), jnp.int32)), dense_attend)
        kv = None if context_layer is None else (cache.k[context_layer].astype(jnp.float32),
                                                 cache.v[context_layer].astype(jnp.float32))
        return hidden.astype(jnp.float32), kv

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
                 progress: bool = True, context_layer: int | None = None) -> Corpus:
    """sequences: (prompt ids, answer ids) -> their hidden states (and `context_layer`'s keys and
    values) by a forward pass over each whole sequence, in batches of one padded length (sorted by
    length, padded to a multiple of 32: a compile per length bucket, and against powers of two a
    third fewer positions computed)."""
    hidden_fn = _hidden_fn(loaded, context_layer)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    hs, ks, vs = [None] * len(sequences), [None] * len(sequences), [None] * len(sequences)
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
        h, kv = hidden_fn(arr)
        h, kv = np.asarray(h), None if kv is None else [np.asarray(a) for a in kv]
        for r, (i, s) in enumerate(zip(idx, seqs)):
            hs[i] = h[r, :len(s)]
            if kv is not None:
                ks[i], vs[i] = kv[0][r, :len(s)], kv[1][r, :len(s)]
    kv = (None, None) if context_layer is None else (np.concatenate(ks), np.concatenate(vs))
    return Corpus(np.concatenate(hs), np.concatenate([np.asarray(p + a, np.int32) for p, a in sequences]),
                  *_layout(sequences, unroll), *kv)


def corpus_from_states(sequences: Sequence[tuple[list[int], list[int]]], states: Sequence[np.ndarray],
                       unroll: int, caches: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> Corpus:
    """sequences: (prompt ids, answer ids), states: each answer's hidden states as `answer_with_hidden`
    captured them ([len(answer), D]: the one that sampled each answer token) -> a Corpus with no
    second pass. Row t of the hidden states is h_t for t from the prompt's last position to the
    answer's second-to-last (every row a training start or a held-out walk reads); the prompt's
    earlier rows and the last token's are zero. `caches`: `answer_with_hidden`'s keys and values
    (every position but the last, which is never computed; its row is zero)."""
    D = next((len(h[0]) for h in states if len(h)), 0)
    hs = []
    for (prompt, answer), h in zip(sequences, states):
        if len(h) != len(answer):
            raise ValueError(f"{len(h)} hidden states for an answer of {len(answer)} tokens")
        hs += [np.zeros((len(prompt) - 1, D), np.float32), np.asarray(h, np.float32).reshape(-1, D),
               np.zeros((1, D), np.float32)]
    kv = (None, None)
    if caches is not None:
        pad = lambda a: np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)])  # noqa: E731 (the last token)
        kv = tuple(np.concatenate([pad(c[j]) for c in caches]) for j in (0, 1))
    return Corpus(np.concatenate(hs) if hs else np.zeros((0, D), np.float32),
                  np.concatenate([np.asarray(p + a, np.int32) for p, a in sequences] + [np.zeros(0, np.int32)]),
                  *_layout(sequences, unroll), *kv)


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
                       progress: bool = True, context_layer: int | None = None):
    """`answer`'s answers and, for each, the target's hidden states [len(answer), D] (float32, before
    the final norm) that sampled its tokens: the prompt's last position's, then each answer token's
    but the last. They are the rows the engine's sampler reads (`Runner.hidden_sink`), so the head's
    training data costs no second forward pass (`corpus_from_states`; decision 64). With
    `context_layer`, each sequence's keys and values of that layer as the paged cache holds them
    ([len(prompt) + len(answer) - 1, K, H] each: every position the target computed), read from its
    pages when it finishes; else None. -> (answers, states, caches)"""
    return _answers(loaded, prompt_ids, max_tokens, batch, progress, keep_hidden=True, context_layer=context_layer)


def _answers(loaded, prompt_ids, max_tokens: int, batch: int, progress: bool, keep_hidden: bool,
             context_layer: int | None = None):
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
    caches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
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
                    i = int(out.request_id)
                    answers[i] = list(out.outputs[0].token_ids)
                    if context_layer is not None:
                        caches[i] = _cached(engine.runner, out.request_id, context_layer,
                                            len(prompt_ids[i]) + len(answers[i]) - 1)
    ordered = [answers[i] for i in range(len(prompt_ids))]
    if not keep_hidden:
        return ordered, None
    D = loaded.config.hidden_size
    return (ordered, [np.asarray(hidden[str(i)], np.float32).reshape(-1, D) for i in range(len(prompt_ids))],
            [caches[i] for i in range(len(prompt_ids))] if context_layer is not None else None)


def _cached(runner, request_id: str, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A request's first n positions' keys and values of `layer`, read from its pages right after the
    step it finished in: the runner still holds its page table until the next step, and its pages,
    freed, are written again no sooner than that step's forward (synchronous steps)."""
    pages = jnp.asarray(runner.requests[request_id].block_ids, jnp.int32)
    return tuple(np.asarray(c[layer, pages], np.float32).reshape(-1, *c.shape[-2:])[:n]
                 for c in (runner.kv_cache.k, runner.kv_cache.v))
