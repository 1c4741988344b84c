"""x @ W for a weight stored quantized (int8 or packed int4 groups, `jaxinfer.quantization`).

    quantized_matmul(x, values, scale, offset=None, *, bits, transpose=False, out_dtype=None,
                     backend="auto") -> [..., N]

      x       [..., K] activations (float32 / bfloat16)
      values  W's stored values, grouped along K:  int8 [K, N]  or  uint8 [K/2, N] (int4, two per byte)
              (with transpose=True: [N, K] / [N, K/2], the layout of an embedding used as lm_head)
      scale   float32 [K/G, N] (or [N, K/G]): one scale per group of G inputs
      offset  float32 like scale, or None:  W = values * scale + offset

The product accumulates in float32 and returns `out_dtype` (default x's dtype).

    float_matmuls(x, [W, ...], transpose=False)   float weights: on CPU, steps of a few tokens in the
                                                  native float32 kernel (`float_matmul_cpu`), else XLA

Backends, chosen like attention's (`pallas_kernels.ops.resolve_backend`):

    auto         the platform's: the Pallas kernel on GPU / TPU; on CPU the native kernel
                 (`quantized_matmul_cpu`, C++ through XLA's FFI) for steps of at most
                 `quantized_matmul_cpu.MAX_ROWS` tokens, the reference beyond (or where it cannot be built)
    reference    dequantize W (per layer, inside the layer loop) and one XLA dot
    pallas_gpu   Triton kernel: tiles of W dequantized in registers (interpret mode off GPU),
                 `quantized_matmul_gpu`
    pallas_tpu   Mosaic kernel: tiles of W dequantized in VMEM (interpret mode off TPU),
                 `quantized_matmul_tpu`

Both kernels take int4 without interleaving nibbles: byte j of a group holds the group's elements j
and j + G/2, so x's K columns are split once (`split_int4_activations`) into x_lo (the first half
of every group) and x_hi (the second), and x @ W = x_lo @ W_lo + x_hi @ W_hi where W_lo / W_hi are
the bytes' low / high nibbles dequantized in place, each a [K/2, N] matrix grouped by G/2 rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp

__all__ = ["dequantize", "float_matmuls", "matmul_backend", "quantized_matmul", "quantized_matmul_reference",
           "quantized_matmuls", "split_int4_activations", "unpack_int4", "weight_dims"]


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


def weight_dims(k: int, values, scale, offset, *, bits: int, transpose: bool) -> tuple[int, int, int]:
    """(stored rows along K, N, group size G) of a quantized W for activations with `k` inputs.

    Raises:
      ValueError: the arrays do not describe a [k, N] weight in `bits` containers.
    """
    if values.ndim != 2 or scale.ndim != 2:
        raise ValueError(f"values {values.shape} and scale {scale.shape} must be 2-D")
    kv, n = (values.shape[1], values.shape[0]) if transpose else values.shape
    n_groups = scale.shape[1 if transpose else 0]
    group = k // max(n_groups, 1)
    ok = (bits in (4, 8) and kv * (2 if bits == 4 else 1) == k and n_groups * group == k
          and scale.shape == ((n, n_groups) if transpose else (n_groups, n))
          and (offset is None or offset.shape == scale.shape)
          and (bits == 8 or (group % 2 == 0 and offset is not None)))
    if not ok:
        raise ValueError(f"x's {k} inputs do not fit an int{bits} weight {values.shape} with scale {scale.shape} "
                         f"and offset {None if offset is None else offset.shape} ({transpose=})")
    return kv, n, group


def split_int4_activations(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (x_lo, x_hi), each [M, K/2]: the first and the second half of every group of
    `group` columns, so column r of both meets packed row r of an int4 weight (its low and its high
    nibble)."""
    m, k = x.shape
    halves = x.reshape(m, k // group, 2, group // 2)
    return halves[:, :, 0].reshape(m, k // 2), halves[:, :, 1].reshape(m, k // 2)


_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("quantized_matmul_backend", default="auto")


@contextlib.contextmanager
def matmul_backend(backend: str):
    """Within this block (at trace time), `quantized_matmul` calls without a backend use `backend`:
    the engine's step functions set their attention backend here, so the model code, which only
    says `quantized_matmul(...)`, runs the same implementation family as its attention."""
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def _use_native_cpu(name: str, x) -> bool:
    """Whether an "auto" call on CPU takes the native kernel (a step of at most MAX_ROWS tokens)."""
    if name != "auto" or jax.default_backend() != "cpu":
        return False
    from pallas_kernels import quantized_matmul_cpu

    return math.prod(x.shape[:-1]) <= quantized_matmul_cpu.MAX_ROWS and quantized_matmul_cpu.available()


def quantized_matmul(x, values, scale, offset=None, *, bits: int, transpose: bool = False, out_dtype=None,
                     backend: str | None = None):
    """x @ W through `backend` (None: the one `matmul_backend` set, else "auto"; see the module
    docstring); the Pallas backends run their kernel in interpret mode off their platform."""
    from pallas_kernels.ops import resolve_backend

    name = backend or _BACKEND.get()
    impl = resolve_backend(name)
    if impl == "reference" and _use_native_cpu(name, x):
        from pallas_kernels import quantized_matmul_cpu

        return quantized_matmul_cpu.quantized_matmul_cpu(x, values, scale, offset, bits=bits, transpose=transpose,
                                                         out_dtype=out_dtype)
    kwargs = dict(bits=bits, transpose=transpose, out_dtype=out_dtype)
    if impl == "pallas_gpu":
        from pallas_kernels.quantized_matmul_gpu import quantized_matmul_gpu

        return quantized_matmul_gpu(x, values, scale, offset, interpret=jax.default_backend() != "gpu", **kwargs)
    if impl == "pallas_tpu":
        from pallas_kernels.quantized_matmul_tpu import quantized_matmul_tpu

        return quantized_matmul_tpu(x, values, scale, offset, interpret=jax.default_backend() != "tpu", **kwargs)
    return quantized_matmul_reference(x, values, scale, offset, **kwargs)


def float_matmuls(x, weights, *, transpose: bool = False, preferred_element_type=None,
                  backend: str | None = None) -> list[jax.Array]:
    """[x @ W for W in weights] for float weights (transpose: x @ W.T with W [N, K], the tied
    embedding as the output projection). On CPU under "auto" (no mesh), a step of float32 x and
    weights of `float_matmul_cpu.MIN_ROWS` to `MAX_ROWS` rows goes to the native kernel in one call
    (XLA's dot reads the weights at half the memory's speed or less from 2 rows on); otherwise XLA's
    dot (`x @ W`, or an einsum with `preferred_element_type`)."""
    from pallas_kernels import float_matmul_cpu

    if (backend or _BACKEND.get()) == "auto" and float_matmul_cpu.use(x, weights):  # (checks the platform)
        return float_matmul_cpu.float_matmuls_cpu(x, weights, transpose=transpose)
    if preferred_element_type is None and not transpose:
        return [x @ w for w in weights]
    spec = "...k,nk->...n" if transpose else "...k,kn->...n"
    return [jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type) for w in weights]


def quantized_matmuls(x, weights, *, out_dtype=None, backend: str | None = None) -> list[jax.Array]:
    """[x @ W for W in weights], weights as (values, scale, offset or None, bits): several
    projections of one input (q / k / v, gate / up). On CPU's native kernel they are one call whose
    threads share the joint columns (a small projection alone runs on one thread); elsewhere one
    `quantized_matmul` each."""
    from pallas_kernels.ops import resolve_backend

    name = backend or _BACKEND.get()
    if resolve_backend(name) == "reference" and _use_native_cpu(name, x):
        from pallas_kernels import quantized_matmul_cpu

        return quantized_matmul_cpu.quantized_matmuls_cpu(x, weights, out_dtype=out_dtype)
    return [quantized_matmul(x, v, s, o, bits=b, out_dtype=out_dtype, backend=backend) for v, s, o, b in weights]
