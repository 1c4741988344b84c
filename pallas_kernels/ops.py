"""The attention contract the engine calls, and the choice of implementation behind it.

    write_kv(k_cache, v_cache, k, v, slot_mapping, layer=None) -> (k_cache, v_cache)
    ragged_paged_attention(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           layer=None, sliding_window=None, q_block=1, max_prefill_seqs=None,
                           backend="auto") -> [T, N, H]
    decode_attention_by_pages(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos, *,
                              layer=None, sliding_window=None, backend="auto") -> [S, N, H]

Arguments are described in `paged_attention_reference`. `backend` is "auto" (the platform's
default), or "reference" (pure jnp, any platform). The Pallas kernels (TPU Mosaic, GPU Triton)
are added behind the same signature by the kernels issue; until then every platform runs the
reference.
"""

from __future__ import annotations

import jax

from pallas_kernels.paged_attention_reference import (decode_attention_by_pages as _decode_reference,
                                                     ragged_paged_attention_reference, write_kv)

__all__ = ["BACKENDS", "decode_attention_by_pages", "ragged_paged_attention", "resolve_backend", "write_kv"]

BACKENDS = ("auto", "reference")


def resolve_backend(backend: str = "auto") -> str:
    """The implementation `backend` names on this platform."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return "reference"


def ragged_paged_attention(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, *, layer=None,
                           sliding_window: int | None = None, q_block: int = 1, max_prefill_seqs: int | None = None,
                           backend: str = "auto") -> jax.Array:
    resolve_backend(backend)
    return ragged_paged_attention_reference(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs,
                                            sliding_window=sliding_window, layer=layer, q_block=q_block,
                                            max_prefill_seqs=max_prefill_seqs)


def decode_attention_by_pages(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos, *, layer=None,
                              sliding_window: int | None = None, backend: str = "auto") -> jax.Array:
    resolve_backend(backend)
    return _decode_reference(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos, layer=layer,
                             sliding_window=sliding_window)
