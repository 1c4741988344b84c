"""x @ W for a weight stored quantized (int8 or packed int4 groups, `jaxinfer.quantization`).

    quantized_matmul(x, values, scale, offset=None, *, bits, transpose=False, out_dtype=None,
                     backend="auto") -> [..., N]

      x       [..., K] activations (float32 / bfloat16)
      values  W's stored values, grouped along K:  int8 [K, N]  or  uint8 [K/2, N] (int4, two per byte)
              (with transpose=True: [N, K] / [N, K/2], the layout of an embedding used as lm_head)
      scale   float32 [K/G, N] (or [N, K/G]): one scale per group of G inputs
      offset  float32 like scale, or None:  W = values * scale + offset

The product accumulates in float32 and returns `out_dtype` (default x's dtype).

Backends, chosen like attention's (`pallas_kernels.ops.resolve_backend`):

    reference    dequantize W (per layer, inside the layer loop) and one XLA dot; the CPU path
    pallas_gpu   Triton kernel: tiles of W dequantized in registers (interpret mode off GPU)
    pallas_tpu   Mosaic kernel: tiles of W dequantized in VMEM (interpret mode off TPU)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dequantize", "quantized_matmul", "quantized_matmul_reference", "unpack_int4"]


def unpack_int4(packed: jax.Array, axis: int, group: int) -> jax.Array:
    """uint8 bytes -> uint8 values 0..15 along `axis` (doubled): within each group of `group`
    values, byte j holds element j (low nibble) and j + group/2 (high nibble)."""
    axis = axis % packed.ndim
    shape = packed.shape
    g = packed.reshape(shape[:axis] + (shape[axis] * 2 // group, group // 2) + shape[axis + 1:])
    both = jnp.concatenate([g & 0xF, g >> 4], axis=axis + 1)
    return both.reshape(shape[:axis] + (shape[axis] * 2,) + shape[axis + 1:])


def dequantize(values: jax.Array, scale: jax.Array, offset: jax.Array | None, *, bits: int, axis: int,
               dtype=jnp.float32) -> jax.Array:
    """The float weight: values * scale + offset per group along `axis`, computed in float32 (so a
    GGUF's blocks give exactly the gguf package's floats), returned as `dtype`."""
    axis = axis % values.ndim
    n_groups = scale.shape[axis]
    n = values.shape[axis] * (2 if bits == 4 else 1)
    group = n // n_groups
    if bits == 4:
        values = unpack_int4(values, axis, group)
    grouped = values.shape[:axis] + (n_groups, group) + values.shape[axis + 1:]
    w = values.reshape(grouped).astype(jnp.float32) * jnp.expand_dims(scale, axis + 1)
    if offset is not None:
        w = w + jnp.expand_dims(offset, axis + 1)
    return w.reshape(values.shape).astype(dtype)


def quantized_matmul_reference(x, values, scale, offset=None, *, bits: int, transpose: bool = False,
                               out_dtype=None):
    """Dequantize W to x's dtype, then one dot accumulating in float32."""
    out_dtype = out_dtype or x.dtype
    w = dequantize(values, scale, offset, bits=bits, axis=1 if transpose else 0, dtype=x.dtype)
    spec = "...k,nk->...n" if transpose else "...k,kn->...n"
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def quantized_matmul(x, values, scale, offset=None, *, bits: int, transpose: bool = False, out_dtype=None,
                     backend: str = "auto"):
    from pallas_kernels.ops import resolve_backend

    impl = resolve_backend(backend)
    if impl == "reference":
        return quantized_matmul_reference(x, values, scale, offset, bits=bits, transpose=transpose,
                                          out_dtype=out_dtype)
    raise NotImplementedError(f"quantized_matmul backend {impl!r}")
