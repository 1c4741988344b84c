"""x @ W for a quantized W (`pallas_kernels.quantized_matmul`) as a Pallas kernel on the Triton lowering.

x is flattened to [M, K]. A program computes one [bm, bn] tile of the output, walking K in steps
of bk stored rows:

    grid = (M / bm, N / bn)
    step k0:  x tile  [bm, bk]   (per part, see below)
              W tile  [bk, bn]   values, gathered by integer row / column indices
              scale, offset [bk, bn]   gathered by group index (k0 + arange(bk)) // rows_per_group
              acc += x tile @ (values * scale + offset).astype(x.dtype)        (f32 accumulator)

W is dequantized in registers exactly as the reference does (float32 math, then x's dtype), so a
bfloat16 product sees the very weights the reference sees. Gathering scales row by row handles
any group size against any bk (a group may span several steps, or a step several groups; a
per-channel scale is one row) at the price of one scale / offset load per weight element, which
the L1/L2 cache serves: a tile touches only bk / G distinct scale rows. When a step lies within one
group (G a multiple of bk, as for per-channel int8) the kernel loads that one row instead.

int4 (two nibbles per byte, byte j of a group holding its elements j and j + G/2) is never
interleaved: the wrapper splits x's columns into x_lo and x_hi (`split_int4_activations`), and a
step adds x_lo tile @ W_lo + x_hi tile @ W_hi, where W_lo / W_hi are the low / high nibbles of the
same [bk, bn] bytes, grouped by G/2 packed rows.

transpose=True (values [N, K], an embedding as lm_head) is read in place: the kernel gathers
[bn, bk] tiles and contracts them transposed (`plgpu.dot(..., trans_b=True)`), so the weight is
never copied.

Odd shapes are padded where it is cheap and masked where it is not: x is padded with zero rows and
columns to whole tiles (activations are small) and the output is computed on whole tiles and
sliced. W is never padded (a copy of the weight per call would cost more than the matmul reads):
its row / column indices are clamped into range, so a tile past N repeats W's last column (those
outputs are sliced off) and a tile past K repeats its last row (it meets x's zero columns).

Dots take power-of-two dims >= 16 (Triton's tl.dot). `precision=HIGHEST`: IEEE float32 dots for
float32 (not TF32) and the native MMA for bfloat16, as in the attention kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quantized_matmul import split_int4_activations, weight_dims

MIN_DOT_DIM = 16  # Triton's tl.dot needs every dimension >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_blocks(m: int, n: int, kv: int, bits: int) -> tuple[int, int, int]:
    """(bm, bn, bk): rows of x per program (16 for decode batches, up to 64), 128 output columns
    and 64 stored rows of W per step (32 for int4, whose step dequantizes two nibble tiles), each
    shrunk to the problem's size. Chosen for register use at num_warps=4 (a [bk, bn] float32 tile
    is 64 registers a thread); not tuned on hardware."""

    def fit(size: int, cap: int) -> int:
        return min(cap, max(MIN_DOT_DIM, _next_pow2(size)))

    return fit(m, 64), fit(n, 128), fit(kv, 64 if bits == 8 else 32)


def _kernel(*refs, num_parts: int, has_offset: bool, transpose: bool, rows_per_group: int, block_k: int,
            num_k_blocks: int, precision):
    x_refs, (v_ref, s_ref) = refs[:num_parts], refs[num_parts:num_parts + 2]
    off_ref = refs[num_parts + 2] if has_offset else None
    o_ref = refs[-1]
    i, j = pl.program_id(0), pl.program_id(1)
    bm, bn = o_ref.shape
    n, kv = v_ref.shape if transpose else v_ref.shape[::-1]
    # Clamped indices: every load is in range, so W needs no padding (see the module docstring).
    cols = jnp.minimum(j * bn + jnp.arange(bn, dtype=jnp.int32), n - 1)

    def body(step, acc):
        k0 = step * block_k
        rows = jnp.minimum(k0 + jnp.arange(block_k, dtype=jnp.int32), kv - 1)
        if rows_per_group % block_k:
            groups = rows // rows_per_group
        else:  # the step lies in one group (per-channel scales): one scale row, broadcast
            groups = jnp.full((1,), k0 // rows_per_group, jnp.int32)
        if transpose:  # [bn, bk] tiles
            index, group_index = (cols[:, None], rows[None, :]), (cols[:, None], groups[None, :])
        else:  # [bk, bn] tiles
            index, group_index = (rows[:, None], cols[None, :]), (groups[:, None], cols[None, :])
        packed = plgpu.load(v_ref.at[index])
        scale = plgpu.load(s_ref.at[group_index])
        offset = plgpu.load(off_ref.at[group_index]) if has_offset else None
        parts = (packed,) if num_parts == 1 else (packed & 0xF, packed >> 4)
        for x_ref, q in zip(x_refs, parts):
            w = q.astype(jnp.float32) * scale
            if offset is not None:
                w = w + offset
            x = x_ref[pl.ds(i * bm, bm), pl.ds(k0, block_k)]
            acc += plgpu.dot(x, w.astype(x.dtype), trans_b=transpose, precision=precision)
        return acc

    acc = jax.lax.fori_loop(0, num_k_blocks, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def quantized_matmul_gpu(x, values, scale, offset=None, *, bits: int, transpose: bool = False, out_dtype=None,
                         block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                         num_warps: int = 4, num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """x [..., K] @ W on the Triton kernel -> [..., N] in `out_dtype` (default x's dtype).

    Arguments as `quantized_matmul_reference` (W stored as int8 [K, N] or packed int4 [K/2, N],
    float32 scale / offset [K/G, N]; all transposed with transpose=True). Block sizes: `block_m`
    rows of x and `block_n` columns of W per program, `block_k` stored rows of W per step (for
    int4, packed rows: 2 * block_k inputs), each a power of two >= 16 (None: `default_blocks`).
    `num_warps` / `num_stages` are Triton's. `interpret=True` runs the kernel on any backend.

    Raises:
      ValueError: inconsistent shapes, or a block size that is not a power of two >= 16.
    """
    out_dtype = out_dtype or x.dtype
    *lead, k = x.shape
    kv, n, group = weight_dims(k, values, scale, offset, bits=bits, transpose=transpose)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    defaults = default_blocks(m, n, kv, bits)
    bm, bn, bk = (d if b is None else b for b, d in zip((block_m, block_n, block_k), defaults))
    for name, b in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if b & (b - 1) or b < MIN_DOT_DIM:
            raise ValueError(f"{name} must be a power of two >= {MIN_DOT_DIM}, got {b}")
    if m == 0 or n == 0:
        return jnp.zeros((*lead, n), out_dtype)
    parts = split_int4_activations(x2, group) if bits == 4 else (x2,)
    mp, kp, np_ = _round_up(m, bm), _round_up(kv, bk), _round_up(n, bn)
    parts = [jnp.pad(p, ((0, mp - m), (0, kp - kv))) for p in parts]
    has_offset = offset is not None
    kernel = functools.partial(
        _kernel, num_parts=len(parts), has_offset=has_offset, transpose=transpose,
        rows_per_group=group // 2 if bits == 4 else group, block_k=bk, num_k_blocks=kp // bk,
        precision=jax.lax.Precision.HIGHEST)
    whole = pl.no_block_spec  # loaded tile by tile inside the kernel
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=[whole] * (len(parts) + 2 + has_offset),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"quantized_matmul_int{bits}_bm{bm}_bn{bn}_bk{bk}",
    )(*parts, values, scale, *((offset,) if has_offset else ()))
    return out[:m, :n].reshape(*lead, n)
