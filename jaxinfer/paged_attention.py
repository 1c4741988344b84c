"""The paged KV cache on the device and the `Attend` that runs the model over it.

A step's tokens from every scheduled sequence are packed into one ragged row (B = 1, T tokens),
so prefill chunks and decodes share one step:

    tokens    [1, T]  seq a chunk | seq b decode | seq c chunk | padding
    positions [1, T]  absolute position of each token (RoPE)
    meta              slot_mapping [T], kv_lens [S], page_table [S, max_pages], cu_q_lens [S + 1], num_seqs

Attention goes through `pallas_kernels.ops`: the Pallas kernels on TPU and GPU, the jnp
reference on CPU (and wherever `attention_backend="reference"`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels.kv_quant import QuantizedPages, bytes_per_token_head, rotate


@flax.struct.dataclass
class PagedKVCache:
    k: jax.Array | QuantizedPages  # [L, P, page_size, K, H]: each layer's pages contiguous
    v: jax.Array | QuantizedPages  # [L, P, page_size, K, H]  (8-bit values + scales: `kv_quant`)

    @classmethod
    def zeros(cls, *, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype,
              kv_cache_dtype: str = "auto") -> "PagedKVCache":
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        if kv_cache_dtype != "auto":
            return cls(k=QuantizedPages.zeros(shape, kv_cache_dtype, dtype),
                       v=QuantizedPages.zeros(shape, kv_cache_dtype, dtype))
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @staticmethod
    def bytes_per_page(*, num_layers, page_size, num_kv_heads, head_dim, dtype, kv_cache_dtype: str = "auto") -> int:
        return 2 * num_layers * page_size * num_kv_heads * bytes_per_token_head(head_dim, kv_cache_dtype, dtype)


@flax.struct.dataclass
class DecodeItems:
    """A decode step's (sequence, page) work items (`pallas_kernels.ops.decode_attention_by_pages`)."""

    seq: jax.Array  # [I] int32
    page: jax.Array  # [I, pages_per_item] int32
    pos: jax.Array  # [I] int32: position of the group's first token (padding: past every length)


@flax.struct.dataclass
class PagedAttentionMeta:
    slot_mapping: jax.Array  # [T] int32: flat slot (page * page_size + offset) of each token
    kv_lens: jax.Array  # [S] int32: tokens in the cache per sequence after this step
    page_table: jax.Array  # [S, max_pages] int32 (padding entries: the null page 0)
    cu_q_lens: jax.Array  # [S + 1] int32: cumulative tokens per sequence in this step
    num_seqs: jax.Array  # [] int32: sequences in use
    decode_items: DecodeItems | None = None  # set on decode-only steps (T = S, one token each)
    # a verify step of draft trees (`speculative.tree`): per row, the chunk's first position and the
    # bits of the chunk's rows it sees (-1: causal); decode-only steps only
    tree_base: jax.Array | None = None  # [S] int32
    tree_mask: jax.Array | None = None  # [S] int32


def paged_attend(q, k, v, kv_cache: PagedKVCache, layer, meta: PagedAttentionMeta, *,
                 sliding_window=None, sm_scale: float | None = None, soft_cap: float | None = None,
                 q_block: int = 1, max_prefill_seqs: int | None = None, backend: str = "auto"):
    """q: [1, T, N, H]; k, v: [1, T, K, H] (one ragged row) -> (out [1, T, N, H], kv_cache).

    The write and the read index the whole [L, ...] cache with `layer`: slicing one layer's pool
    out first copies it every layer (measured on XLA:CPU, SmolLM2 decode: 330 ms vs 33 ms a step).
    """
    quantized = isinstance(kv_cache.k, QuantizedPages)
    if quantized:  # 8-bit pages hold rotated heads: outlier channels spread before quantizing
        q, k, v = rotate(q), rotate(k), rotate(v)
    new_k, new_v = ops.write_kv(kv_cache.k, kv_cache.v, k[0], v[0], meta.slot_mapping, layer=layer)
    if meta.decode_items is not None:
        items = meta.decode_items
        out = ops.decode_attention_by_pages(q[0], new_k, new_v, meta.kv_lens, items.seq, items.page, items.pos,
                                            layer=layer, sliding_window=sliding_window, sm_scale=sm_scale,
                                            soft_cap=soft_cap, backend=backend, tree_base=meta.tree_base,
                                            tree_mask=meta.tree_mask)
    else:
        if meta.tree_mask is not None:
            raise ValueError("draft trees are verified on the decode path only (one-token rows)")
        out = ops.ragged_paged_attention(q[0], new_k, new_v, meta.kv_lens, meta.page_table, meta.cu_q_lens,
                                         meta.num_seqs, layer=layer, sliding_window=sliding_window,
                                         sm_scale=sm_scale, soft_cap=soft_cap, q_block=q_block,
                                         max_prefill_seqs=max_prefill_seqs, backend=backend)
    if quantized:
        out = rotate(out, transpose=True)
    return out[None], PagedKVCache(k=new_k, v=new_v)
