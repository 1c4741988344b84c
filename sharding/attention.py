"""Paged attention per tensor-parallel shard, under shard_map.

The Pallas kernels are custom calls XLA cannot partition, and attention needs no communication
when each shard owns whole GQA groups (`sharding/heads.py`): each `model` shard runs the kernel
on its own query heads and its own KV heads of the cache.

    q, k, v   [1, T, heads, H]        split over heads on `model`
    kv cache  [L, P, page, K, H]      split over K on `model`
    metadata  slot mapping, page table, lengths: replicated (host inputs)
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxinfer.paged_attention import PagedKVCache


def shard_attend(attend, mesh: Mesh):
    """`attend(q, k, v, kv_cache, layer, meta)` run per `model` shard."""
    heads = P(None, None, "model", None)
    cache = PagedKVCache(k=P(None, None, None, "model", None), v=P(None, None, None, "model", None))

    def sharded(q, k, v, kv_cache, layer, meta):
        meta_spec = jax.tree.map(lambda _: P(), meta)
        if isinstance(layer, int):  # unrolled layers: a static index
            def local(q, k, v, kv_cache, meta):
                return attend(q, k, v, kv_cache, layer, meta)
            args, specs = (q, k, v, kv_cache, meta), (heads, heads, heads, cache, meta_spec)
        else:  # scanned layers: a traced index, replicated
            local = attend
            args, specs = (q, k, v, kv_cache, layer, meta), (heads, heads, heads, cache, P(), meta_spec)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(heads, cache), check_vma=False)(*args)

    return sharded
