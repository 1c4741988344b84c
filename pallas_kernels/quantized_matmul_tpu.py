"""x @ W for a quantized W (`pallas_kernels.quantized_matmul`) as a Pallas TPU (Mosaic) kernel.

x is flattened to [M, K]; a program accumulates one [bm, bn] output tile over one [bk, bn] tile of
stored rows of W, the K axis innermost:

    grid = (M / bm, N / bn, Kv / bk)      ("parallel", "parallel", "arbitrary")
    x tile       [bm, bk]   (per part, see below)                    VMEM, by BlockSpec
    values tile  [bk, bn]   int8 / uint8                             VMEM, by BlockSpec
    scale, offset  [bk / rows_per_group, bn] rows of this tile's groups, or all [Kv / rows_per_group, bn]
    acc          [bm, bn] float32                                    VMEM scratch
    acc += x tile @ (values * scale + offset).astype(x.dtype); the last K step writes acc out

The W tile is dequantized in VMEM in float32 (as the reference does, then cast to x's dtype). The
scale rows are expanded down the sublanes, one row per group broadcast over its rows_per_group
rows ([g, bn] -> [g, rows_per_group, bn] -> [bk, bn]), or, when a group spans whole tiles, the
single row is broadcast in the multiply. bk is chosen so that one of the two holds.

int4: the wrapper splits x's columns into x_lo and x_hi (`split_int4_activations`), and a step adds
x_lo @ W_lo + x_hi @ W_hi, W_lo / W_hi being the low / high nibbles of the same [bk, bn] bytes
(rows_per_group = G / 2), so nibbles are never interleaved in VMEM. Nibbles and int8 values are
widened through int32, which every TPU generation's VPU handles.

Tiling: the last two dims of each block are multiples of the TPU tile ((8, 128) for float32,
(16, 128) for bfloat16, (32, 128) for 8-bit) or the whole dim: bm a multiple of 16, bn and bk of
128, or the full M / N / Kv. Scale blocks of bk / rows_per_group rows are used when that is a
multiple of 8; otherwise the block holds every group row of its columns (fetched once per output
tile, [Kv / rows_per_group, bn] float32) and the kernel slices this step's rows from it.

Odd shapes: M and N need no padding: edge blocks are partial, their extra rows / columns of x and
W are unspecified but only reach outputs that are never written. K does: x is padded with zero
columns to whole tiles (activations are cheap to copy) and, when Kv is not a multiple of bk, the
dequantized rows past Kv are zeroed in the kernel (the partial tile's unspecified values would
otherwise meet x's zeros as NaN * 0). W itself is never copied, except for transpose=True, which
this kernel takes by transposing values, scale and offset in the wrapper (one XLA transpose of the
weight per call; a caller using a transposed weight every step is better off storing it [K, N]).
Grouped scales are padded with rows only in the rare case of a ragged K whose scale block is
sliced in the kernel.

Not yet run on a TPU: tested in the TPU interpreter (which fills out-of-bounds block reads with
NaN, so the masking above is exercised) and lowered to Mosaic on CPU. The block defaults come
from VMEM arithmetic, not measurement.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul import split_int4_activations, weight_dims

LANES, SUBLANES = 128, 8
ROW_ALIGN = 16  # bm: a bfloat16 tile's sublanes (also a multiple of float32's 8)
DEFAULT_BLOCKS = (512, 512, 512)  # (bm, bn, bk) targets


def _fits_groups(bk: int, rows_per_group: int) -> bool:
    """A tile's rows cover whole groups, or lie within one group."""
    return bk % rows_per_group == 0 or rows_per_group % bk == 0


def choose_block_k(kv: int, rows_per_group: int, target: int = DEFAULT_BLOCKS[2]) -> int:
    """Stored rows of W per K step: all of them when they fit `target`; else the largest multiple of
    128 up to `target` that fits the groups (`_fits_groups`), one dividing Kv if any (no ragged last
    tile to mask); all of them when no multiple of 128 fits the groups."""
    if kv <= target:
        return kv
    candidates = [b for b in range(target - target % LANES, 0, -LANES) if _fits_groups(b, rows_per_group)]
    exact = [b for b in candidates if kv % b == 0]
    return (exact or candidates or [kv])[0]


def _kernel(*refs, num_parts: int, has_offset: bool, rows_per_group: int, scale_tiled: bool,
            valid_rows: int | None, precision):
    x_refs, (v_ref, s_ref) = refs[:num_parts], refs[num_parts:num_parts + 2]
    off_ref = refs[num_parts + 2] if has_offset else None
    o_ref, acc_ref = refs[-2:]
    k = pl.program_id(2)
    bk, bn = v_ref.shape

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def group_rows(ref):
        """This tile's scale (or offset) as [bk, bn], or [1, bn] when the tile lies in one group."""
        if bk % rows_per_group:  # the tile lies within one group
            return ref[pl.ds(jax.lax.div(k * bk, rows_per_group), 1), :]
        g = bk // rows_per_group
        rows = ref[...] if scale_tiled or g == ref.shape[0] else ref[pl.ds(k * g, g), :]
        if g == 1:
            return rows
        return jnp.broadcast_to(rows[:, None, :], (g, rows_per_group, bn)).reshape(bk, bn)

    scale = group_rows(s_ref)
    offset = group_rows(off_ref) if has_offset else None
    values = v_ref[...].astype(jnp.int32)
    parts = (values,) if num_parts == 1 else (values & 0xF, values >> 4)
    valid = None
    if valid_rows is not None:  # a ragged last tile: rows past Kv hold unspecified values
        valid = k * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < valid_rows
    acc = acc_ref[...]
    for x_ref, q in zip(x_refs, parts):
        w = q.astype(jnp.float32) * scale
        if offset is not None:
            w = w + offset
        if valid is not None:
            w = jnp.where(valid, w, 0.0)
        acc += jnp.dot(x_ref[...], w.astype(x_ref.dtype), preferred_element_type=jnp.float32, precision=precision)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _check_block(name: str, b: int, full: int, align: int) -> int:
    """`b` as a legal block dim of a `full`-sized axis: the whole axis when b covers it."""
    if b >= full:
        return full
    if b <= 0 or b % align:
        raise ValueError(f"{name} must be a multiple of {align} (or cover the whole axis of {full}), got {b}")
    return b


def quantized_matmul_tpu(x, values, scale, offset=None, *, bits: int, transpose: bool = False, out_dtype=None,
                         block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                         num_warps: int = 4, num_stages: int = 2, interpret=False) -> jax.Array:
    """x [..., K] @ W on the Mosaic kernel -> [..., N] in `out_dtype` (default x's dtype).

    Arguments as `quantized_matmul_reference`. Block sizes: `block_m` rows of x (a multiple of 16),
    `block_n` columns of W and `block_k` stored rows of W per step (for int4, packed rows: 2 *
    block_k inputs), both multiples of 128; a block covering its whole axis is always legal, and
    block_k must also cover whole groups or lie within one. None: `DEFAULT_BLOCKS` (512: a step's
    float32 W tile is 1 MiB of VMEM), block_k from `choose_block_k`. `num_warps` / `num_stages`
    are the GPU kernel's and ignored here (one signature for both). `interpret`: False, True or a
    `pltpu.InterpretParams` (True: default parameters) to run in the TPU interpreter.

    Raises:
      ValueError: inconsistent shapes, or a block size that breaks the tiling rules.
    """
    del num_warps, num_stages
    out_dtype = out_dtype or x.dtype
    *lead, k = x.shape
    kv, n, group = weight_dims(k, values, scale, offset, bits=bits, transpose=transpose)
    if transpose:
        values, scale = values.T, scale.T
        offset = None if offset is None else offset.T
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return jnp.zeros((*lead, n), out_dtype)
    rows_per_group = group // 2 if bits == 4 else group
    bm = _check_block("block_m", DEFAULT_BLOCKS[0] if block_m is None else block_m, m, ROW_ALIGN)
    bn = _check_block("block_n", DEFAULT_BLOCKS[1] if block_n is None else block_n, n, LANES)
    bk = choose_block_k(kv, rows_per_group) if block_k is None else _check_block("block_k", block_k, kv, LANES)
    if not _fits_groups(bk, rows_per_group):
        raise ValueError(f"block_k {bk} must be a multiple or a divisor of the {rows_per_group} stored rows per group")
    num_k = -(-kv // bk)
    parts = split_int4_activations(x2, group) if bits == 4 else (x2,)
    parts = [jnp.pad(p, ((0, 0), (0, num_k * bk - kv))) for p in parts]

    # Scale blocks: this tile's group rows when they fill whole sublanes (or are all of them), else
    # every group row of the block's columns, sliced in the kernel.
    n_groups = scale.shape[0]
    g = bk // rows_per_group
    scale_tiled = bk % rows_per_group == 0 and (g % SUBLANES == 0 or g == n_groups)
    if scale_tiled:
        scale_spec = pl.BlockSpec((g, bn), lambda i, j, kk: (kk, j))
    else:
        if bk % rows_per_group == 0 and num_k * g > n_groups:  # a ragged last tile would slice past the end
            pad = ((0, num_k * g - n_groups), (0, 0))
            scale = jnp.pad(scale, pad)
            offset = None if offset is None else jnp.pad(offset, pad)
        scale_spec = pl.BlockSpec((scale.shape[0], bn), lambda i, j, kk: (0, j))
    has_offset = offset is not None
    kernel = functools.partial(
        _kernel, num_parts=len(parts), has_offset=has_offset, rows_per_group=rows_per_group,
        scale_tiled=scale_tiled, valid_rows=kv if kv % bk else None,
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    out = pl.pallas_call(
        kernel,
        grid=(-(-m // bm), -(-n // bn), num_k),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))] * len(parts)
        + [pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))] + [scale_spec] * (1 + has_offset),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name=f"quantized_matmul_int{bits}_bm{bm}_bn{bn}_bk{bk}",
    )(*parts, values, scale, *((offset,) if has_offset else ()))
    return out.reshape(*lead, n)
