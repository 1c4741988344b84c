"""Runner: a SchedulerOutput -> one padded ragged StepInput -> one jit step -> sampled tokens.

    SchedulerOutput.chunks  a: 6 tokens @0 | b: 1 token @9 | c: 4 tokens @0     (S = 3 sequences)
    StepInput.tokens [1, T] a a a a a a b c c c c 0 0 0 0 0                     (T padded to a bucket)
    slot_mapping     [T]    a's slots ... | padding -> null page 0
    logits_indices   [1, S] last token of each chunk (only chunks that sample use their token)

Token and sequence counts are padded to bucket lists, so the compiled graphs are a fixed set;
the KV cache is donated to the step and updated in place.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.model import params_for_layer_loop
from jaxinfer.paged_attention import PagedAttentionMeta, PagedKVCache, paged_attend
from jaxinfer.request import Request
from jaxinfer.sampling import sample, step_keys
from jaxinfer.scheduler import SchedulerOutput


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """Attributes:
      page_size: tokens per KV page.
      num_pages: pages in the device cache (page 0 is the null page).
      max_pages_per_seq: page-table width (max_model_len / page_size, rounded up).
      token_buckets: padded token counts per step, ascending; the last must cover
        max_num_batched_tokens.
      seq_buckets: padded sequence counts per step, ascending; the last must cover max_num_seqs.
    """

    page_size: int
    num_pages: int
    max_pages_per_seq: int
    token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    seq_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)

    def __post_init__(self):
        for name in ("token_buckets", "seq_buckets"):
            b = getattr(self, name)
            if not b or list(b) != sorted(set(b)) or b[0] <= 0:
                raise ValueError(f"{name} must be ascending positive integers, got {b}")


def _bucket(buckets: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]}; raise the bucket list")
    return buckets[i]


@flax.struct.dataclass
class StepInput:
    tokens: jax.Array  # [1, T] int32
    positions: jax.Array  # [1, T] int32
    meta: PagedAttentionMeta
    logits_indices: jax.Array  # [1, S] int32
    temperature: jax.Array  # [S] f32
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] f32
    seeds: jax.Array  # [S] uint32
    num_generated: jax.Array  # [S] int32


class Runner:
    """Owns the device KV cache and the jit step."""

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, runner_config: RunnerConfig):
        self.config = config
        self.rc = runner_config
        self.graphdef = graphdef
        self.params = params_for_layer_loop(config, params)
        self.kv_cache = PagedKVCache.zeros(num_layers=config.num_layers, num_pages=runner_config.num_pages,
                                           page_size=runner_config.page_size, num_kv_heads=config.num_kv_heads,
                                           head_dim=config.head_dim, dtype=jnp.dtype(config.dtype))
        self._attend = functools.partial(paged_attend, sliding_window=config.sliding_window)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    def _step_fn(self, params, kv_cache, batch: StepInput):
        model = nnx.merge(self.graphdef, params)
        logits, kv_cache = model(batch.tokens, batch.positions, kv_cache, batch.meta, self._attend,
                                 logits_indices=batch.logits_indices)
        keys = step_keys(batch.seeds, batch.num_generated)
        return kv_cache, sample(logits[0], batch.temperature, batch.top_k, batch.top_p, keys)

    def build_batch(self, out: SchedulerOutput, requests: Mapping[str, Request],
                    seeds: Mapping[str, int]) -> StepInput:
        """Packs the scheduled chunks into one padded ragged row (numpy, then device)."""
        rc, page = self.rc, self.rc.page_size
        num_tokens = sum(len(c.token_ids) for c in out.chunks)
        T = _bucket(rc.token_buckets, num_tokens, "tokens")
        S = _bucket(rc.seq_buckets, len(out.chunks), "sequences")
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.zeros(T, np.int32)  # padding writes into the null page
        page_table = np.zeros((S, rc.max_pages_per_seq), np.int32)
        kv_lens = np.zeros(S, np.int32)
        cu = np.zeros(S + 1, np.int32)
        logits_indices = np.zeros(S, np.int32)
        temperature, top_p = np.zeros(S, np.float32), np.ones(S, np.float32)
        top_k, seed_arr, num_generated = np.zeros(S, np.int32), np.zeros(S, np.uint32), np.zeros(S, np.int32)
        t = 0
        for s, chunk in enumerate(out.chunks):
            n, start = len(chunk.token_ids), chunk.start_pos
            pos = np.arange(start, start + n)
            blocks = np.asarray(chunk.block_ids, np.int32)
            tokens[t:t + n] = chunk.token_ids
            positions[t:t + n] = pos
            slots[t:t + n] = blocks[pos // page] * page + pos % page
            page_table[s, :len(blocks)] = blocks
            kv_lens[s] = start + n
            cu[s + 1] = t + n
            logits_indices[s] = t + n - 1
            request = requests[chunk.request_id]
            p = request.sampling_params
            temperature[s], top_p[s], top_k[s] = p.temperature, p.top_p, p.top_k
            seed = p.seed if p.seed is not None else seeds[chunk.request_id]
            seed_arr[s] = seed % (1 << 32)
            num_generated[s] = len(request.output_token_ids)
            t += n
        cu[len(out.chunks) + 1:] = t
        meta = PagedAttentionMeta(slot_mapping=slots, kv_lens=kv_lens, page_table=page_table, cu_q_lens=cu,
                                  num_seqs=np.int32(len(out.chunks)))
        return StepInput(tokens=tokens[None], positions=positions[None], meta=meta,
                         logits_indices=logits_indices[None], temperature=temperature, top_k=top_k, top_p=top_p,
                         seeds=seed_arr, num_generated=num_generated)

    def execute(self, out: SchedulerOutput, requests: Mapping[str, Request],
                seeds: Mapping[str, int]) -> dict[str, int]:
        """Runs one step; returns the sampled token of every chunk that samples."""
        if out.is_empty:
            return {}
        batch = self.build_batch(out, requests, seeds)
        self.kv_cache, tokens = self._step(self.params, self.kv_cache, batch)
        tokens = np.asarray(tokens)
        return {c.request_id: int(tokens[s]) for s, c in enumerate(out.chunks) if c.samples}
