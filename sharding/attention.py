"""Paged attention per tensor-parallel shard, under shard_map.

The Pallas kernels are custom calls XLA cannot partition, and attention needs no communication
when each shard owns whole GQA groups (`sharding/heads.py`): each `model` shard runs the kernel
on its own query heads and its own KV heads of the cache.

    q, k, v   [1, T, heads, H]        split over heads on `model` (and tokens on `data`)
    kv cache  [L, P, page, K, H]      split over K on `model` (and pages on `data`)
    metadata  slot mapping, page table, lengths: replicated (split on `data`)
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxinfer.paged_attention import PagedKVCache


def shard_attend(attend, mesh: Mesh):
    """`attend(q, k, v, kv_cache, layer, meta)` run per `model` shard, and per `data` replica
    when the mesh has several (`jaxinfer/data_parallel.py`: tokens, sequences and cache pages of
    replica r are the r-th slices, the metadata's page ids local to the replica)."""
    data = "data" if mesh.shape["data"] > 1 else None
    heads = P(None, data, "model", None)
    cache = PagedKVCache(k=P(None, data, None, "model", None), v=P(None, data, None, "model", None))

    def sharded(q, k, v, kv_cache, layer, meta):
        meta_spec = jax.tree.map(lambda _: P(data) if data else P(), meta)

        def local(q, k, v, kv_cache, meta, layer=layer):
            if data is not None:  # this replica's sequence count: a [1] slice -> a scalar
                meta = meta.replace(num_seqs=meta.num_seqs.reshape(()))
            return attend(q, k, v, kv_cache, layer, meta)

        if isinstance(layer, int):  # unrolled layers: a static index
            args, specs = (q, k, v, kv_cache, meta), (heads, heads, heads, cache, meta_spec)
        else:  # scanned layers: a traced index, replicated
            args, specs = (q, k, v, kv_cache, meta, layer), (heads, heads, heads, cache, meta_spec, P())
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(heads, cache), check_vma=False)(*args)

    return sharded
