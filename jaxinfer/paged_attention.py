"""The paged KV cache on the device and the `Attend` that runs the model over it.

A step's tokens from every scheduled sequence are packed into one ragged row (B = 1, T tokens),
so prefill chunks and decodes share one step:

    tokens    [1, T]  seq a chunk | seq b decode | seq c chunk | padding
    positions [1, T]  absolute position of each token (RoPE)
    meta              slot_mapping [T], kv_lens [S], page_table [S, max_pages], cu_q_lens [S + 1], num_seqs

Attention is `pallas_kernels.paged_attention_reference` for now; the kernels issue swaps in the
Pallas kernels behind the same arguments.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention_reference import ragged_paged_attention_reference, write_kv


@flax.struct.dataclass
class PagedKVCache:
    k: jax.Array  # [L, P, page_size, K, H]: each layer's pages contiguous
    v: jax.Array  # [L, P, page_size, K, H]

    @classmethod
    def zeros(cls, *, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype) -> "PagedKVCache":
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @staticmethod
    def bytes_per_page(*, num_layers, page_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


@flax.struct.dataclass
class PagedAttentionMeta:
    slot_mapping: jax.Array  # [T] int32: flat slot (page * page_size + offset) of each token
    kv_lens: jax.Array  # [S] int32: tokens in the cache per sequence after this step
    page_table: jax.Array  # [S, max_pages] int32 (padding entries: the null page 0)
    cu_q_lens: jax.Array  # [S + 1] int32: cumulative tokens per sequence in this step
    num_seqs: jax.Array  # [] int32: sequences in use


def paged_attend(q, k, v, kv_cache: PagedKVCache, layer, meta: PagedAttentionMeta, *,
                 sliding_window: int | None = None):
    """q: [1, T, N, H]; k, v: [1, T, K, H] (one ragged row) -> (out [1, T, N, H], kv_cache)."""
    k_pages, v_pages = write_kv(kv_cache.k[layer], kv_cache.v[layer], k[0], v[0], meta.slot_mapping)
    kv_cache = PagedKVCache(k=kv_cache.k.at[layer].set(k_pages), v=kv_cache.v.at[layer].set(v_pages))
    out = ragged_paged_attention_reference(q[0], k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens,
                                           meta.num_seqs, sliding_window=sliding_window)
    return out[None], kv_cache
