"""Reference generator: a static batch over a dense KV cache, jit prefill and jit decode.

This is the simplest correct way to run the model and stays as the oracle the paged engine is
tested against (DESIGN.md, correctness chain). Shapes are bucketed so a handful of graphs serve
any request mix:

    batch B   -> next power of two              (padding rows are greedy and ignored)
    prompt T  -> next power of two >= 16        (prompts left-aligned, positions 0..T-1)
    cache S   -> next power of two >= T and >= longest prompt + max_tokens, capped at the context

Decoding runs one jit step per token with the stop checks on the host (EOS, stop tokens, stop
strings, max_tokens, context end), which keeps every request's text exact.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.attention import DenseAttentionMeta, DenseKVCache, dense_attend
from jaxinfer.config import ModelConfig
from jaxinfer.model import params_for_layer_loop
from jaxinfer.sampling import SamplingParams, sample, step_keys

logger = logging.getLogger(__name__)


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class Generation:
    """What the generator produced for one prompt."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclasses.dataclass
class _Row:
    """Host-side progress of one sequence in the static batch."""

    params: SamplingParams
    prompt_len: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ReferenceGenerator:
    """Generates for a static batch of prompts with a dense KV cache.

    Args:
      config: the model's config.
      graphdef, params: the NNX model, split (`jaxinfer.loader.LoadedModel`).
      max_model_len: context limit in tokens (defaults to the model's).
    """

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, *,
                 max_model_len: int | None = None):
        self.config = config
        self.graphdef = graphdef
        # The unrolled loop reads per-layer arrays (see model.unstack_layers); the caller may drop
        # its stacked copy afterwards.
        self.params = params_for_layer_loop(config, params)
        self.max_model_len = min(max_model_len or config.max_position_embeddings,
                                 config.max_position_embeddings)
        self._attend = dense_attend
        self._prefill = jax.jit(self._prefill_step, donate_argnums=(1,))
        self._decode = jax.jit(self._decode_step, donate_argnums=(1,))
        self._forward = jax.jit(self._forward_all)

    # ---- jit steps (pure: params, cache, inputs -> cache, outputs) ------------------------------

    def _run(self, params, cache, tokens, positions, start_pos, logits_indices):
        model = nnx.merge(self.graphdef, params)
        meta = DenseAttentionMeta(start_pos=start_pos)
        return model(tokens, positions, cache, meta, self._attend, logits_indices=logits_indices)

    def _prefill_step(self, params, cache, tokens, lengths, temperature, top_k, top_p, seeds):
        """tokens [B, T] (left-aligned), lengths [B] -> (cache, first new token [B])."""
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        logits, cache = self._run(params, cache, tokens, positions, jnp.zeros((B,), jnp.int32),
                                  (lengths - 1)[:, None])
        keys = step_keys(seeds, jnp.zeros((B,), jnp.int32))
        return cache, sample(logits[:, 0], temperature, top_k, top_p, keys)

    def _decode_step(self, params, cache, tokens, positions, num_generated, temperature, top_k, top_p,
                     seeds):
        """tokens, positions [B] -> (cache, next token [B])."""
        logits, cache = self._run(params, cache, tokens[:, None], positions[:, None], positions, None)
        keys = step_keys(seeds, num_generated)
        return cache, sample(logits[:, 0], temperature, top_k, top_p, keys)

    def _forward_all(self, params, tokens):
        """tokens [1, T] -> logits [1, T, V] at every position (for fidelity checks)."""
        T = tokens.shape[1]
        cache = self._empty_cache(1, T)
        positions = jnp.arange(T, dtype=jnp.int32)[None]
        logits, _ = self._run(params, cache, tokens, positions, jnp.zeros((1,), jnp.int32), None)
        return logits

    def _empty_cache(self, batch_size: int, max_len: int) -> DenseKVCache:
        c = self.config
        return DenseKVCache.zeros(num_layers=c.num_layers, batch_size=batch_size, max_len=max_len,
                                  num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=jnp.dtype(c.dtype))

    # ---- host API -----------------------------------------------------------------------------

    def warmup(self, *, batch_size: int = 1, prompt_len: int = 1, max_tokens: int = 16) -> None:
        """Compiles the prefill and decode steps of the buckets such a batch lands in."""
        B = next_power_of_two(batch_size)
        T = next_power_of_two(prompt_len, 16)
        S = min(next_power_of_two(max(prompt_len + max_tokens, T)), next_power_of_two(self.max_model_len))
        f32, i32 = np.zeros(B, np.float32), np.zeros(B, np.int32)
        seeds, ones = jnp.zeros(B, jnp.uint32), np.ones(B, np.float32)
        cache, tokens = self._prefill(self.params, self._empty_cache(B, S), np.zeros((B, T), np.int32),
                                      np.ones(B, np.int32), f32, i32, ones, seeds)
        _, tokens = self._decode(self.params, cache, tokens, np.ones(B, np.int32), i32, f32, i32, ones, seeds)
        jax.block_until_ready(tokens)

    def logits(self, prompt_token_ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] (float32) at every position of one prompt."""
        return np.asarray(self._forward(self.params, jnp.asarray([list(prompt_token_ids)], jnp.int32))[0])

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
                 eos_token_ids: Sequence[int] = (), decode: Callable[[list[int], bool], str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        """Generates for every prompt in one static batch.

        Args:
          prompts: token ids per prompt; each non-empty and shorter than max_model_len (the caller
            validates: `jaxinfer.llm` raises typed errors first).
          params: sampling parameters per prompt.
          eos_token_ids: ids that end a sequence unless its params say ignore_eos.
          decode: ids, skip_special_tokens -> text; needed for text and stop strings.
          seeds: per-prompt seeds used when params.seed is None.
        """
        n = len(prompts)
        B = next_power_of_two(n)
        lengths = [len(p) for p in prompts]
        T = next_power_of_two(max(lengths), 16)
        want = max(l + p.max_tokens for l, p in zip(lengths, params))
        S = min(next_power_of_two(max(want, T)), next_power_of_two(self.max_model_len))
        rows = [_Row(params=p, prompt_len=l) for p, l in zip(params, lengths)]

        tokens = np.zeros((B, T), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        pad = B - n
        temperature = np.array([p.temperature for p in params] + [0.0] * pad, np.float32)
        top_k = np.array([p.top_k for p in params] + [0] * pad, np.int32)
        top_p = np.array([p.top_p for p in params] + [1.0] * pad, np.float32)
        seed_list = [p.seed if p.seed is not None else (seeds[i] if seeds else 0) for i, p in enumerate(params)]
        seed_arr = np.array([s % (1 << 32) for s in seed_list] + [0] * pad, np.uint32)
        len_arr = np.array(lengths + [1] * pad, np.int32)

        # Per-row constants go to the device once, not with every step.
        temperature, top_k, top_p, seed_arr = map(jnp.asarray, (temperature, top_k, top_p, seed_arr))
        cache = self._empty_cache(B, S)
        cache, next_tokens = self._prefill(self.params, cache, tokens, len_arr, temperature, top_k, top_p,
                                           seed_arr)
        positions = len_arr.copy()
        eos = frozenset(eos_token_ids)
        step = 0
        while True:
            new = np.asarray(next_tokens)
            for i, row in enumerate(rows):
                if row.finish_reason is None:
                    self._append(row, int(new[i]), eos, decode)
            if all(r.finish_reason is not None for r in rows):
                break
            step += 1
            num_generated = np.full((B,), step, np.int32)
            cache, next_tokens = self._decode(self.params, cache, new.astype(np.int32), positions,
                                              num_generated, temperature, top_k, top_p, seed_arr)
            positions = positions + 1
        return [Generation(token_ids=r.token_ids, text=r.text, finish_reason=r.finish_reason,
                           stop_reason=r.stop_reason) for r in rows]

    def _append(self, row: _Row, token: int, eos: frozenset, decode) -> None:
        """Adds one token to a row and decides whether it is finished."""
        p = row.params
        row.token_ids.append(token)
        if decode is not None:
            row.text = decode(row.token_ids, p.skip_special_tokens)
        if (token in eos and not p.ignore_eos) or token in p.stop_token_ids:
            row.finish_reason, row.stop_reason = "stop", token
            return
        if p.stop and decode is not None:
            hits = [(row.text.find(s), s) for s in p.stop if s in row.text]
            if hits:
                at, s = min(hits)
                row.text = row.text[:at]
                row.finish_reason, row.stop_reason = "stop", s
                return
        if len(row.token_ids) >= p.max_tokens or row.prompt_len + len(row.token_ids) >= self.max_model_len:
            row.finish_reason = "length"
