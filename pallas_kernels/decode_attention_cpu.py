"""Decode attention over paged K/V on CPU: a small C++ kernel (`csrc/decode_attention_cpu.cc`) called
through XLA's FFI, built on first use like the native matmuls (`quantized_matmul_cpu.build`).

Why: the reference (`paged_attention_reference.decode_attention_by_pages`: a gather of every work
item's pages, a batched einsum, segment max and sums) runs on XLA:CPU at a fraction of the memory's
speed, and a verify step pays it once per position (docs/BENCHMARKS.md). The kernel walks each row's
pages once with an online softmax and computes every row with the same float operations whatever the
other rows of the step or the threads.
`ops.ragged_paged_attention` sends it mixed steps too on CPU, every query row a decode row
(`paged_attention_reference.ragged_rows_as_decodes`).

    decode_attention_cpu(q, k_cache, v_cache, kv_lens, item_seq, item_pages, item_pos, *, layer=None,
                         sliding_window=None, sm_scale=None, soft_cap=None)     the reference's contract
    use(q, k_cache)     float32 query and pages (not 8-bit), on the CPU backend, the kernel available

JAXINFER_NATIVE_CPU=0 turns it off with the native matmuls; JAXINFER_NATIVE_ATTENTION=0 only this one.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import quantized_matmul_cpu

TARGET = "jaxinfer_decode_attention"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "decode_attention_cpu.cc")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (tries once per process)."""
    return quantized_matmul_cpu.register(SOURCE, "JaxinferDecodeAttention", TARGET, "decode attention",
                                         "JAXINFER_NATIVE_ATTENTION")


def use(q, k_cache) -> bool:
    """Whether `decode_attention_cpu` should take this call: the CPU backend, float32 query and pages
    (8-bit pages are `kv_quant.QuantizedPages`, not arrays) of the query's head dim (no padded
    lanes), the kernel available."""
    return (jax.default_backend() == "cpu" and isinstance(k_cache, jax.Array | np.ndarray)
            and q.dtype == jnp.float32 and k_cache.dtype == jnp.float32 and q.shape[-1] == k_cache.shape[-1]
            and available())


def decode_attention_cpu(q, k_cache, v_cache, kv_lens, item_seq, item_pages, item_pos, *, layer=None,
                         sliding_window=None, sm_scale: float | None = None, soft_cap: float | None = None,
                         tree_base=None, tree_mask=None):
    """`paged_attention_reference.decode_attention_by_pages` (same arguments and result) on the
    native kernel. sliding_window: None, an int or a traced int32 scalar (0 or less: none).

    Raises:
      RuntimeError: the kernel could not be built here (see `available`).
    """
    if not available():
        raise RuntimeError("the native CPU decode attention could not be built here; use the reference backend")
    S, N, H = q.shape
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    window = jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32).reshape(())
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    out = jax.ShapeDtypeStruct((S, N, H), jnp.float32)
    if tree_mask is None:  # (every row causal)
        tree_base, tree_mask = jnp.zeros((S,), jnp.int32), jnp.full((S,), -1, jnp.int32)
    return jax.ffi.ffi_call(TARGET, out)(
        q, k_cache, v_cache, layer, window, i32(kv_lens), i32(item_seq), i32(item_pages), i32(item_pos),
        i32(tree_base), i32(tree_mask),
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        threads=np.int64(quantized_matmul_cpu.THREADS))
