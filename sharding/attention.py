"""Paged attention per tensor-parallel shard, under shard_map.

The Pallas kernels are custom calls XLA cannot partition, and attention needs no communication
when each shard owns whole GQA groups (`sharding/heads.py`): each `model` shard runs the kernel
on its own query heads and its own KV heads of the cache.

    q, k, v   [1, T, heads, H]        split over heads on `model` (and tokens on `data`)
    kv cache  [L, P, page, K, H]      split over K on `model` (and pages on `data`)
    metadata  slot mapping, page table, lengths: replicated (split on `data`)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxinfer.paged_attention import PagedKVCache
from pallas_kernels.kv_quant import QuantizedPages, rotate


def cache_specs(kv_cache: PagedKVCache, axes: tuple):
    """PartitionSpecs of every array of the cache: `axes` names [L, P, page, K, H]; an 8-bit
    cache's scales [L, P, 1, K, page] have K where the values have it, and take the same names."""
    return jax.tree.map(lambda x: P(*axes[:x.ndim]), kv_cache)


def shard_attend(attend, mesh: Mesh):
    """`attend(q, k, v, kv_cache, layer, meta)` run per `model` shard, and per `data` replica
    when the mesh has several (`jaxinfer/data_parallel.py`: tokens, sequences and cache pages of
    replica r are the r-th slices, the metadata's page ids local to the replica)."""
    data = "data" if mesh.shape["data"] > 1 else None
    heads = P(None, data, "model", None)

    def sharded(q, k, v, kv_cache, layer, meta, *, sliding_window=None, sm_scale=None, soft_cap=None):
        cache = cache_specs(kv_cache, (None, data, None, "model", None))
        meta_spec = jax.tree.map(lambda _: P(data) if data else P(), meta)
        # Static values (unrolled layers) are closed over; traced ones (a scanned layer's index and
        # window) enter the shard_map as replicated arguments.
        traced = {name: x for name, x in (("layer", layer), ("sliding_window", sliding_window))
                  if isinstance(x, jax.Array)}
        static = {"layer": layer, "sliding_window": sliding_window}

        def local(q, k, v, kv_cache, meta, traced):
            if data is not None:  # this replica's sequence count: a [1] slice -> a scalar
                meta = meta.replace(num_seqs=meta.num_seqs.reshape(()))
            kw = static | traced
            return attend(q, k, v, kv_cache, kw["layer"], meta, sliding_window=kw["sliding_window"],
                          sm_scale=sm_scale, soft_cap=soft_cap)

        specs = (heads, heads, heads, cache, meta_spec, {name: P() for name in traced})
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(heads, cache),
                             check_vma=False)(q, k, v, kv_cache, meta, traced)

    return sharded


def seq_parallel_attend(mesh: Mesh):
    """Paged attention with the step's tokens and the KV pool's pages split over `seq` (and heads
    over `model`): sequence parallelism for long prompts.

        each seq shard:  its T / seq tokens' q, k, v      its stripe of pages (pages j % seq == s
                                                          of every sequence, `BlockPool` stripes)
        all-gather the step's q, k, v over `seq`; write the new keys that land in this stripe
        attention of every query over this stripe's keys -> (out, lse)
        combine the stripes by log-sum-exp (pmax, psum), keep this shard's tokens

    KV memory and attention work both divide by the `seq` size; the price is the all-gathers of
    the step's q/k/v and one psum of the outputs per layer. The jnp reference computes the
    stripes (the kernels do not return a log-sum-exp yet).
    """
    from jax import lax

    from pallas_kernels import ops
    from pallas_kernels.paged_attention_reference import NEG_LSE, ragged_paged_attention_partial

    tokens = P(None, "seq", "model", None)

    def local(q, k, v, kv_cache, meta, layer, sliding_window, *, windowed, sm_scale, soft_cap):
        s = lax.axis_index("seq")
        sliding_window = sliding_window if windowed else None
        q_all, k_all, v_all = (lax.all_gather(x, "seq", axis=1, tiled=True)[0] for x in (q, k, v))
        quantized = isinstance(kv_cache.k, QuantizedPages)
        if quantized:  # as paged_attend: 8-bit pages hold rotated heads
            q_all, k_all, v_all = rotate(q_all), rotate(k_all), rotate(v_all)
        P_local, page_size = kv_cache.k.shape[1], kv_cache.k.shape[2]  # (8-bit pages report their values' shape)
        first_page = s * P_local
        page = meta.slot_mapping // page_size - first_page
        # Keys of other stripes get an out-of-range slot: scatter updates out of bounds are dropped.
        slots = jnp.where((page >= 0) & (page < P_local), page * page_size + meta.slot_mapping % page_size,
                          P_local * page_size)
        new_k, new_v = ops.write_kv(kv_cache.k, kv_cache.v, k_all, v_all, slots, layer=layer)
        out, lse = ragged_paged_attention_partial(q_all, new_k, new_v, meta.kv_lens, meta.page_table, meta.cu_q_lens,
                                                  meta.num_seqs, stripe=s, num_stripes=mesh.shape["seq"],
                                                  layer=layer, sliding_window=sliding_window, sm_scale=sm_scale,
                                                  soft_cap=soft_cap)
        m = lax.pmax(lse, "seq")
        w = jnp.where(lse > NEG_LSE / 2, jnp.exp(lse - m), 0.0)
        num, den = lax.psum(w[..., None] * out, "seq"), lax.psum(w, "seq")
        full = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
        if quantized:
            full = rotate(full, transpose=True)
        T_local = q.shape[1]
        mine = lax.dynamic_slice_in_dim(full, s * T_local, T_local, axis=0)
        return mine[None].astype(q.dtype), PagedKVCache(k=new_k, v=new_v)

    def sharded(q, k, v, kv_cache, layer, meta, *, sliding_window=None, sm_scale=None, soft_cap=None):
        cache = cache_specs(kv_cache, (None, "seq", None, "model", None))
        meta_spec = jax.tree.map(lambda _: P(), meta)
        layer = jnp.asarray(layer, jnp.int32)
        window = jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32)
        body = functools.partial(local, windowed=sliding_window is not None, sm_scale=sm_scale, soft_cap=soft_cap)
        return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, cache, meta_spec, P(), P()),
                             out_specs=(tokens, cache), check_vma=False)(q, k, v, kv_cache, meta, layer, window)

    return sharded
