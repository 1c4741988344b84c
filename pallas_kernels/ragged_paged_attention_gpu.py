"""Ragged paged attention for GPUs: a Pallas kernel on the Triton lowering.

One kernel serves decodes, prefill chunks and whole prefills. The wrapper packs the ragged
queries into blocks of `q_block` tokens of one sequence (`ragged_blocks`); a program computes
one block for one KV head, i.e. q_block * Gp rows (all query heads of the KV head, padded to
Gp so that a dot has >= 16 rows), over the keys that block needs:

    grid = (query block b, KV head kh, split)
    keys of b: [window start, min(kv_len, last query position + 1)) in blocks of block_kv tokens
    split i of num_splits takes an equal share of those blocks (flash-decoding), writing its
    normalised output and log-sum-exp; a jnp combine weighs the splits (num_splits == 1 skips it)

Each block of keys is gathered token by token straight from the stacked [L, P, page, K, H] cache
(page from the page table, slot from the position), so the cache is never sliced or copied. Loads
past the sequence's keys are masked off (neither read nor weighed: unused slots may hold
anything, NaN included). Softmax is online, in f32.

8-bit pages (`kv_quant.QuantizedPages`) come as two inputs each: the int8 / float8 e4m3 values,
gathered as above, and their f32 scales [L, P, 1, K, page], gathered at the same (layer, page,
slot, kv head) positions, one per key of the block ([Bk], consecutive slots at consecutive
addresses). The values convert exactly to q's dtype (|int8| <= 127 and e4m3's 4-bit significands
are bf16 values), and the scales multiply the dots' [R, Bk] sides, where key t is column t,
rather than the [Bk, H] keys and values:

    s = (q . k_t) * k_scale_t * sm_scale       acc += sum_t (p_t * v_scale_t) v_t

which is the reference's q . (k_t * k_scale_t) and sum_t p_t (v_t * v_scale_t) with R * Bk
products instead of Bk * H (R is 16 rows for a decode, H 64 to 256), and f32 scores at least as
accurate as the reference's (which rounds the dequantized keys to the compute dtype). Masked-off
keys' scales are loaded as 0, as their values are. Triton converts e4m3 on compute capability
>= 8.9 only (`ops.kv_cache_dtype_error`).

A mixed batch runs the kernel twice, decodes one token per block and prefill chunks q_block
tokens per block, so a decode's block is not padded to a prefill's rows (measured on an H100,
64 decodes at 2k context plus two 256-token chunks: see docs/BENCHMARKS.md).

Splits exist for batches too small to fill the GPU (one long sequence has only K programs);
`num_splits` is chosen statically from the grid size in `choose_num_splits`. The structure
(pack -> per-block kernel -> combine -> unpack) is the one a Mosaic GPU variant would share.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_quant import scale_shape
from pallas_kernels.paged_attention_reference import block_layouts
from pallas_kernels.ragged_blocks import QueryBlocks, pack_queries, unpack_outputs

NEG = -1e30  # finite mask value: exp(NEG - m) underflows to 0 without inf - inf NaNs
MIN_DOT_ROWS = 16  # Triton's tl.dot needs every dimension >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_group(q_block: int, group: int) -> int:
    """Query heads per KV head padded to a power of two giving >= 16 rows per block."""
    gp = _next_pow2(group)
    while q_block * gp < MIN_DOT_ROWS:
        gp *= 2
    return gp


def choose_num_splits(programs: int, max_kv_blocks: int, target_programs: int = 1024) -> int:
    """Splits per block so the grid has about `target_programs` programs (a few waves on ~132 SMs),
    never more splits than there are key blocks."""
    return max(1, min(max_kv_blocks, -(-target_programs // max(programs, 1))))


def _kernel(seq_ref, first_pos_ref, num_rows_ref, kv_len_ref, layer_ref, window_ref, page_table_ref, q_ref, k_ref,
            v_ref, *refs, page_size, block_kv, group, sm_scale, soft_cap, windowed, num_splits, stacked, quantized,
            precision):
    ks_ref, vs_ref, o_ref, lse_ref = refs if quantized else (None, None, *refs)
    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    window = window_ref[0] if windowed else None  # data: one compiled kernel serves every window
    seq, first, kv_len = seq_ref[b], first_pos_ref[b], kv_len_ref[b]
    R, H = q_ref.shape
    max_pages = page_table_ref.shape[1]
    q = q_ref[...]  # [R, H]
    row_pos = first + jnp.arange(R, dtype=jnp.int32) // group  # [R] query positions
    kv_end = jnp.minimum(kv_len, first + num_rows_ref[b])  # 0 for padding blocks
    kv_start = 0 if window is None else jnp.maximum(first - window + 1, 0)
    blk_start = kv_start // block_kv
    num_kv_blocks = jnp.maximum(pl.cdiv(kv_end, block_kv) - blk_start, 0)
    per_split = pl.cdiv(num_kv_blocks, num_splits)
    lo = blk_start + split * per_split
    hi = jnp.minimum(lo + per_split, blk_start + num_kv_blocks)

    def body(j, carry):
        acc, m, l = carry
        t = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [Bk] key positions
        valid = t < kv_end
        page = page_table_ref[seq, jnp.minimum(t // page_size, max_pages - 1)]  # [Bk]
        slot = t % page_size
        lanes = jnp.arange(H, dtype=jnp.int32)[None, :]  # integer indices throughout: a [Bk, H] gather
        lead = (layer_ref[0],) if stacked else ()
        index = (*lead, page[:, None], slot[:, None], kh, lanes)
        k = plgpu.load(k_ref.at[index], mask=valid[:, None], other=0.0)  # [Bk, H]
        v = plgpu.load(v_ref.at[index], mask=valid[:, None], other=0.0)
        if quantized:  # the same tokens' scales, [L, P, 1, K, page] at (layer, page, 0, kh, slot): [Bk]
            scale_index = (*lead, page, 0, kh, slot)
            k_scale = plgpu.load(ks_ref.at[scale_index], mask=valid, other=0.0)
            v_scale = plgpu.load(vs_ref.at[scale_index], mask=valid, other=0.0)
            k, v = k.astype(jnp.float32).astype(q.dtype), v.astype(jnp.float32).astype(q.dtype)  # exact
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale  # [R, Bk] f32
        if quantized:
            s = s * k_scale[None, :]  # q . (k * scale_t) = (q . k) * scale_t: key t is column t
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = valid[None, :] & (t[None, :] <= row_pos[:, None])
        if window is not None:
            mask &= t[None, :] > row_pos[:, None] - window
        s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + p.sum(axis=1)
        weights = p * v_scale[None, :] if quantized else p  # sum_t p_t (v_t * scale_t)
        acc = alpha[:, None] * acc + plgpu.dot(weights.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    init = (jnp.zeros((R, H), jnp.float32), jnp.full((R,), NEG, jnp.float32), jnp.zeros((R,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
    has_keys = l > 0
    o_ref[...] = jnp.where(has_keys[:, None], acc / jnp.where(has_keys, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), NEG)


def _combine_splits(o, lse):
    """o [splits, NB, K, R, H] (each split normalised), lse [splits, NB, K, R] -> [NB, K, R, H]."""
    m = lse.max(axis=0)
    w = jnp.where(lse > NEG / 2, jnp.exp(lse - m[None]), 0.0)  # splits without keys weigh nothing
    total = w.sum(axis=0)
    out = (w[..., None] * o).sum(axis=0)
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


def attend_blocks_gpu(blocks: QueryBlocks, k_cache, v_cache, page_table, layer, *, sliding_window, sm_scale,
                      soft_cap, block_kv: int, num_splits: int, num_warps: int, num_stages: int, interpret: bool,
                      k_scale=None, v_scale=None):
    """The kernel over packed query blocks -> [NB, K, R, H] in q's dtype (8-bit caches: with their
    scales `k_scale`, `v_scale`)."""
    NB, K, R, H = blocks.q.shape
    page_size = k_cache.shape[-3]
    stacked = k_cache.ndim == 5
    quantized = k_scale is not None
    group = R // blocks.dest.shape[1]
    kernel = functools.partial(
        _kernel, page_size=page_size, block_kv=block_kv, group=group, sm_scale=sm_scale, soft_cap=soft_cap,
        windowed=sliding_window is not None, num_splits=num_splits, stacked=stacked, quantized=quantized,
        # HIGHEST: IEEE f32 dots for f32 (not TF32), and the native bf16 MMA for bf16. The default
        # asks Triton for TF32 input precision, which with bf16 operands gave wrong results on H100.
        precision=jax.lax.Precision.HIGHEST)
    out_dtype = jnp.float32 if num_splits > 1 else blocks.q.dtype
    whole = pl.no_block_spec
    o, lse = pl.pallas_call(
        kernel,
        grid=(NB, K, num_splits),
        in_specs=[whole] * 7 + [pl.BlockSpec((None, None, R, H), lambda b, h, s: (b, h, 0, 0))]
        + [whole] * (4 if quantized else 2),
        out_specs=[pl.BlockSpec((None, None, None, R, H), lambda b, h, s: (s, b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, R), lambda b, h, s: (s, b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((num_splits, NB, K, R, H), out_dtype),
                   jax.ShapeDtypeStruct((num_splits, NB, K, R), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{R // group}_bkv{block_kv}",
    )(blocks.seq, blocks.first_pos, blocks.num_rows, blocks.kv_len, jnp.asarray(layer, jnp.int32).reshape(1),
      jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32).reshape(1), page_table, blocks.q,
      k_cache, v_cache, *((k_scale, v_scale) if quantized else ()))
    if num_splits == 1:
        return o[0]
    return _combine_splits(o, lse).astype(blocks.q.dtype)


def ragged_paged_attention_gpu(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, *, layer=None,
                               sliding_window=None, sm_scale: float | None = None,
                               soft_cap: float | None = None, q_block: int = 16, max_prefill_seqs: int | None = None,
                               block_kv: int = 64, num_splits: int | None = None, num_warps: int | None = None,
                               num_stages: int = 2, interpret: bool = False, k_scale=None,
                               v_scale=None) -> jax.Array:
    """Causal GQA attention of a ragged batch over paged K/V, on the GPU kernel.

    Arguments as `paged_attention_reference.ragged_paged_attention_reference` (q [T, N, H]; caches
    [P, page, K, H] or [L, P, page, K, H] read at `layer`; 8-bit caches hold int8 / float8 values
    and come with their scales `k_scale`, `v_scale` [P, 1, K, page] or [L, P, 1, K, page], the
    `kv_quant.QuantizedPages` layout). With q_block == 1 every token is a
    block (decode steps). With q_block > 1 the kernel runs twice: once for the sequences with one
    query (decodes, one token per block: a decode never pays for q_block rows) and once for those
    with more, in blocks of q_block tokens (at most `max_prefill_seqs` such sequences; None: any).

    Block sizes: `block_kv` keys per inner step (a power of two >= 16), `num_splits` key ranges per
    block (None: from the grid size), Triton's `num_warps` (None: 4 up to 64 rows per block, else
    8) and `num_stages` (software pipelining depth). Defaults from `benchmarks/bench_attention.py
    --sweep` on an H100 (docs/BENCHMARKS.md). `interpret=True` runs the kernel on any backend.

    Returns:
      [T, N, H] in q's dtype, zeros for padding tokens.
    """
    T, N, H = q.shape
    K = k_cache.shape[-2]
    if H & (H - 1) or H < 16:
        raise ValueError(f"the GPU kernel needs a power-of-two head dim >= 16, got {H} (pad the cache)")
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} KV heads")
    if (k_scale is None) != (v_scale is None) or (k_scale is not None and (
            k_scale.shape != scale_shape(k_cache.shape) or v_scale.shape != scale_shape(v_cache.shape))):
        raise ValueError("8-bit caches need both scales, shaped as kv_quant.scale_shape of their values")
    if block_kv & (block_kv - 1) or block_kv < MIN_DOT_ROWS:
        # Both dots have block_kv as a dimension; below 16 the bf16 MMA path computes garbage.
        raise ValueError(f"block_kv must be a power of two >= {MIN_DOT_ROWS}, got {block_kv}")
    q_block = _next_pow2(q_block)
    max_kv_blocks = -(-page_table.shape[1] * k_cache.shape[-3] // block_kv)
    out = None
    for rows, layout in block_layouts(cu_q_lens, num_seqs, T, q_block, max_prefill_seqs):
        blocks = pack_queries(q, kv_lens, cu_q_lens, num_seqs, num_kv_heads=K, q_block=rows,
                              padded_group=padded_group(rows, N // K), layout=layout)
        NB, _, R, _ = blocks.q.shape
        part = attend_blocks_gpu(
            blocks, k_cache, v_cache, page_table, 0 if layer is None else layer, sliding_window=sliding_window,
            sm_scale=H ** -0.5 if sm_scale is None else sm_scale, soft_cap=soft_cap, block_kv=block_kv,
            num_splits=num_splits or choose_num_splits(NB * K, max_kv_blocks),
            num_warps=num_warps or (4 if R <= 64 else 8), num_stages=num_stages, interpret=interpret,
            k_scale=k_scale, v_scale=v_scale)
        out = unpack_outputs(part, blocks, T, N, q.dtype, into=out)
    return out
