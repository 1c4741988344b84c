"""Ragged paged attention as a Pallas TPU (Mosaic) kernel; the semantics are those of
`paged_attention_reference.ragged_paged_attention_reference`, which it is tested against.

The queries are packed into uniform blocks (`ragged_blocks.pack_queries`) and the kernel runs one
program per (query block, KV head). A program computes the G query heads of its KV head together,
so every KV page it needs is copied into VMEM once for all of them. A mixed batch launches the
kernel twice, decodes one token per block and prefill chunks q_block tokens per block. The caches
stay in HBM and the program copies the pages itself, because which pages it needs is data (the
page table) while a BlockSpec can only follow the grid:

    scalar prefetch (SMEM): seq, first_pos, num_rows, kv_len [NB]; pages [S * max_pages]; layer [1]
    q, out  [R = q_block * Gp, H] per program   (VMEM, by BlockSpec)
    k, v    [L, P, page, K, H]                   (HBM, pl.ANY: copied page by page, strided over K)
    k, v buffers [2, BK = pages_per_block * page, H]   (VMEM scratch: two slots)
    8-bit pages: k, v scales [L, P, 1, K, page]  (HBM, pl.ANY: one [1, page] row per page and head)
    k, v scale buffers [2, pages_per_block, 1, page]  (VMEM scratch: two slots)

Compute block j holds keys j*BK .. (j+1)*BK - 1 of the sequence; its copies run while the block
before it is computed (double buffering):

    start(lo -> slot 0)
    j = lo:     start(lo+1 -> slot 1)   wait(slot 0)   attend(slot 0)
    j = lo+1:   start(lo+2 -> slot 0)   wait(slot 1)   attend(slot 1)   ...

A program visits only the compute blocks holding keys its queries can see: from the sliding-window
start of its first query to its last query (never past kv_len); a padding block (num_rows 0)
visits none and writes zeros. Pages outside that key range are not copied, so buffer rows may hold
stale or uninitialised data (NaN in the interpreter), as may the cache past kv_len: scores are
masked with a finite large negative value, the probabilities of masked keys are set to exactly 0,
and the V rows of keys out of range are zeroed (0 * NaN is NaN). The softmax is online in f32
(running max, sum and accumulator) with an exact division at the end; a row that sees no key
comes out as 0.

8-bit pages (`kv_quant.QuantizedPages`): the int8 / float8 e4m3 values are copied as above (a
quarter of bf16's bytes in VMEM and over the DMA engines) and each page's f32 scales of the
program's KV head with them, one [1, page] row per page (the scales are stored [.., K, page],
tokens on lanes, so that row is one strided row of a tile: `kv_quant` says why). Keys on lanes is
how the scores [R, keys] hold them, so the scales are applied there rather than to the [page, H]
values: the values enter the dots converted to q's dtype (exactly: int8 and e4m3 values are bf16
values; converted through f32, as Mosaic converts 8-bit types), and

    s = (q . k_t) * sm_scale * k_scale_t          acc += sum_t (p_t * v_scale_t) v_t

are the reference's q . (k_t * k_scale_t) and sum_t p_t (v_t * v_scale_t), with R * page
products instead of page * H and no relayout of the scales (a [page, 1] column for the values
would need a lane-to-sublane transpose). A compute block of 8-bit pages is therefore attended page
by page, each page one online-softmax step whose scores are [R, page] and meet a [1, page] scale
row lane for lane (a row of all the block's scales would need lane concatenation, unaligned for
pages under 128 tokens). Masked keys' scales (uncopied slots: NaN or junk) are selected away
before they multiply anything.

Not yet run on a TPU (tested in the interpreter; the Mosaic lowering is checked on CPU). On
hardware the page size should fill whole sublane tiles (8 rows for f32, 16 for bf16, 32 for 8-bit
values) so that each page lands tile-aligned in its buffer, and 8-bit pages want 128 tokens to
fill the lanes of their scores and scale rows (at 64, half of each vreg is padding). Whether
Mosaic accepts the per-head copies, which squeeze the second-minor K axis of the HBM cache (and of
the scales), is unverified (JAX's TPU kernels copy whole [page, K, H] pages or keep the cache
head-major instead), as is its conversion of float8 e4m3 on chips without native fp8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kv_quant import scale_shape
from pallas_kernels.paged_attention_reference import block_layouts
from pallas_kernels.ragged_blocks import pack_queries, unpack_outputs

# Finite, so that exp(MASK_VALUE - running max) is 0 rather than NaN while every key is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SUBLANES = 8  # rows of a TPU vreg: a program's query rows come in whole multiples of it


def padded_group(group: int, q_block: int) -> int:
    """Smallest Gp >= group such that q_block * Gp rows fill whole sublane tiles."""
    Gp = group
    while (q_block * Gp) % SUBLANES:
        Gp += 1
    return Gp


class _PageCopier:
    """The async copies of one program's compute blocks: page p, KV head kh of each cache array
    into a buffer slot. Values [L, P, page, K, H] give a [page, H] slab (strided in HBM) copied
    to the block's rows of a [2, BK, H] buffer; the scales of 8-bit pages [L, P, 1, K, page] give
    a [1, page] row, copied to row i of a [2, pages_per_block, 1, page] buffer. Waiting rebuilds
    the descriptors the start used, so both agree on which pages were copied."""

    def __init__(self, pages_ref, hbm_refs, buffers, sems, *, seq, kv_head, layer, first_key, end_key,
                 max_pages: int):
        self.pages_ref, self.hbm_refs, self.buffers, self.sems = pages_ref, hbm_refs, buffers, sems
        self.seq, self.kv_head, self.layer = seq, kv_head, layer
        self.first_key, self.end_key, self.max_pages = first_key, end_key, max_pages

    def _copies(self, block, slot):
        """(needed, copy) pairs: a page is copied only if it holds a key in [first_key, end_key)."""
        num_pages, page_size = self.hbm_refs[0].shape[1:3]
        pages_per_block = self.buffers[0].shape[1] // page_size
        copies = []
        for i in range(pages_per_block):
            col = block * pages_per_block + i  # page index within the sequence
            needed = (col * page_size < self.end_key) & ((col + 1) * page_size > self.first_key)
            # Page-table entries past a sequence's pages hold 0 or junk: clamp both reads into range.
            entry = self.pages_ref[self.seq * self.max_pages + jnp.minimum(col, self.max_pages - 1)]
            page = jnp.clip(entry, 0, num_pages - 1)
            for n, (src, dst) in enumerate(zip(self.hbm_refs, self.buffers)):
                # values: [page, H] -> rows i * page.. of the slot; scales: [1, page] -> row i of the slot
                target = dst.at[slot, pl.ds(i * page_size, page_size), :] if n < 2 else dst.at[slot, i]
                copy = pltpu.make_async_copy(src.at[self.layer, page, :, self.kv_head, :], target,
                                             self.sems.at[n, slot])
                copies.append((needed, copy))
        return copies

    def start(self, block, slot):
        for needed, copy in self._copies(block, slot):
            pl.when(needed)(copy.start)

    def wait(self, block, slot):
        for needed, copy in self._copies(block, slot):
            pl.when(needed)(copy.wait)


def _attend_block(q, k, v, carry, *, q_pos, k_start, first_key, end_key, sm_scale, sliding_window, soft_cap,
                  k_scale=None, v_scale=None):
    """One online-softmax step of q [R, H] over the keys k, v [BK, H] starting at position k_start.

    carry: (running max [R, 1], running sum [R, 1], accumulator [R, H]), all f32.
    q_pos: [R, BK] int32, the position of each row's query.
    k_scale, v_scale: [1, BK] f32 for 8-bit k, v: key t is k[t] * k_scale[0, t]. The 8-bit values
    enter the dots in q's dtype (exactly: int8 and e4m3 values are bf16 values), and the scales
    multiply the dots' [R, BK] operands and results, where key t is column t, instead of the
    [BK, H] keys: q . (k_t s_t) = (q . k_t) s_t and sum_t p_t (v_t s_t) = sum_t (p_t s_t) v_t.
    """
    m_prev, l_prev, acc_prev = carry
    R, BK = q_pos.shape
    dot_dtype = v.dtype if v_scale is None else q.dtype
    if k_scale is not None:  # 8-bit -> f32 -> q's dtype: Mosaic converts 8-bit types through 32-bit ones
        k = k.astype(jnp.float32).astype(q.dtype)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (R, BK), 1)
    # The key range bound keeps rows of padding tokens (positions past the last query) off
    # uncopied slots too.
    mask = (k_pos >= first_key) & (k_pos < end_key) & (k_pos <= q_pos)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * sm_scale
    if k_scale is not None:
        s = s * k_scale  # uncopied slots' scales (NaN, junk) are masked just below
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # exactly 0: a fully masked block adds nothing
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    v_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
    # Selected in f32: chips without a bf16 VPU (v5e) select 32-bit values.
    v = jnp.where((v_pos >= first_key) & (v_pos < end_key), v.astype(jnp.float32), 0.0).astype(dot_dtype)
    if v_scale is not None:
        p = jnp.where(mask, p * v_scale, 0.0)  # 0 * NaN is NaN: masked keys' scales selected away
    pv = jnp.dot(p.astype(dot_dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv


def ragged_paged_attention_kernel(
    seq_ref,  # [NB] SMEM: the block's sequence
    first_pos_ref,  # [NB] SMEM: position of the block's first query
    num_rows_ref,  # [NB] SMEM: valid query tokens (0: padding block)
    kv_len_ref,  # [NB] SMEM: the sequence's tokens in the cache
    pages_ref,  # [S * max_pages] SMEM: the page table, flattened
    layer_ref,  # [1] SMEM: the cache layer to read
    window_ref,  # [1] SMEM: the sliding window (read when `windowed`)
    q_ref,  # [R, H] VMEM: row r is token r // Gp, query head r % Gp of this KV head
    k_hbm_ref,  # [L, P, page, K, H] HBM
    v_hbm_ref,  # [L, P, page, K, H] HBM
    *refs,  # 8-bit pages: k, v scales [L, P, 1, K, page] HBM; then o_ref, the buffers and sems
    padded_group: int,
    max_pages: int,
    sm_scale: float,
    windowed: bool,
    soft_cap: float | None,
    quantized: bool,
):
    """Attention of one query block over its sequence's pages, for one KV head.

    refs after the caches: [k_scale_hbm_ref, v_scale_hbm_ref (8-bit pages)], o_ref [R, H] VMEM,
    k_buf, v_buf [2, BK, H] VMEM scratch, [k_scale_buf, v_scale_buf [2, pages_per_block, 1, page]
    VMEM scratch (8-bit pages)], sems [2 or 4 (k, v, k scale, v scale), 2 (slot)] DMA semaphores.
    """
    n = 2 if quantized else 0
    hbm_refs = (k_hbm_ref, v_hbm_ref, *refs[:n])
    o_ref, buffers, sems = refs[n], refs[n + 1:2 * n + 3], refs[-1]
    b, kv_head = pl.program_id(0), pl.program_id(1)
    sliding_window = window_ref[0] if windowed else None  # data: one compiled kernel serves every window
    first_pos, num_rows = first_pos_ref[b], num_rows_ref[b]
    R, H = q_ref.shape
    BK = buffers[0].shape[1]
    page_size = k_hbm_ref.shape[2]
    end_key = jnp.minimum(kv_len_ref[b], first_pos + num_rows)  # keys past the last query are unseen
    first_key = jnp.int32(0) if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    # lax.div truncates (all operands are >= 0): a floor division would emit a sign op whose Mosaic
    # lowering depends on the chip generation.
    lo = jax.lax.div(first_key, BK)
    hi = jnp.where(num_rows > 0, jax.lax.div(end_key + BK - 1, BK), lo)  # padding blocks: no compute block
    copier = _PageCopier(pages_ref, hbm_refs, buffers, sems, seq=seq_ref[b], kv_head=kv_head, layer=layer_ref[0],
                         first_key=first_key, end_key=end_key, max_pages=max_pages)

    @pl.when(lo < hi)
    def _():
        copier.start(lo, 0)

    q = q_ref[...]
    # 8-bit pages are attended page by page (see the module docstring): keys per step
    step = page_size if quantized else BK
    q_pos = first_pos + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (R, step), 0), padded_group)
    attend = functools.partial(_attend_block, q, q_pos=q_pos, first_key=first_key, end_key=end_key,
                               sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)

    def body(j, carry):
        slot = jax.lax.rem(j - lo, 2)

        @pl.when(j + 1 < hi)
        def _():
            copier.start(j + 1, 1 - slot)

        copier.wait(j, slot)
        k_buf, v_buf = buffers[:2]
        if not quantized:
            return attend(k_buf[slot], v_buf[slot], carry, k_start=j * BK)
        k_scale_buf, v_scale_buf = buffers[2:]
        for i in range(BK // page_size):
            rows = pl.ds(i * page_size, page_size)
            carry = attend(k_buf[slot, rows, :], v_buf[slot, rows, :], carry, k_start=j * BK + i * page_size,
                           k_scale=k_scale_buf[slot, i], v_scale=v_scale_buf[slot, i])
        return carry

    init = (jnp.full((R, 1), MASK_VALUE, jnp.float32), jnp.zeros((R, 1), jnp.float32), jnp.zeros((R, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _attend_blocks(blocks, k_cache, v_cache, page_table, layer, *, padded_group: int, pages_per_block: int,
                   sm_scale: float, sliding_window, soft_cap, interpret, scales=()):
    """The kernel over packed query blocks [NB, K, R, H] -> [NB, K, R, H]; `scales`: (k_scale,
    v_scale) of 8-bit caches, else ()."""
    NB, K, R, H = blocks.q.shape
    page_size = k_cache.shape[2]
    BK = pages_per_block * page_size
    kernel = functools.partial(ragged_paged_attention_kernel, padded_group=padded_group,
                               max_pages=page_table.shape[1], sm_scale=sm_scale,
                               windowed=sliding_window is not None, soft_cap=soft_cap, quantized=bool(scales))
    block_spec = pl.BlockSpec((None, None, R, H), lambda b, kh, *_: (b, kh, 0, 0))
    scale_buffers = [pltpu.VMEM((2, pages_per_block, 1, page_size), x.dtype) for x in scales]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7,
        grid=(NB, K),
        in_specs=[block_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * (2 + len(scales)),
        out_specs=block_spec,
        scratch_shapes=[pltpu.VMEM((2, BK, H), k_cache.dtype), pltpu.VMEM((2, BK, H), v_cache.dtype),
                        *scale_buffers, pltpu.SemaphoreType.DMA((2 + len(scales), 2))],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((NB, K, R, H), blocks.q.dtype),
        # Programs share no state (each waits for all its copies), so both axes can be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
    )(blocks.seq, blocks.first_pos, blocks.num_rows, blocks.kv_len, page_table.reshape(-1).astype(jnp.int32),
      jnp.asarray(layer, jnp.int32).reshape(1),
      jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32).reshape(1), blocks.q, k_cache, v_cache,
      *scales)
    return out


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "q_block", "pages_per_block",
                                             "max_prefill_seqs", "interpret"))
def ragged_paged_attention_tpu(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, *, layer=None,
                               sliding_window=None, sm_scale: float | None = None,
                               soft_cap: float | None = None, q_block: int = 8, pages_per_block: int = 4,
                               max_prefill_seqs: int | None = None, interpret=False, k_scale=None,
                               v_scale=None) -> jax.Array:
    """Causal GQA attention of a ragged batch over paged K/V on TPU. Returns [T, N, H] in q's dtype
    (zeros for padding tokens).

    Args:
        q: [T, N, H] this step's tokens, sequence s owning q[cu_q_lens[s]:cu_q_lens[s + 1]].
        k_cache, v_cache: [P, page, K, H], or [L, P, page, K, H] read at `layer`; int8 / float8
            values for 8-bit pages, which come with `k_scale` and `v_scale`.
        kv_lens: [S] int32 tokens in the cache per sequence, this step's included.
        page_table: [S, max_pages] int32 pages of each sequence.
        cu_q_lens: [S + 1] int32 cumulative query lengths.
        num_seqs: scalar int32, sequences in use.
        layer: traced int, the layer of a stacked cache (None for a single-layer cache).
        sliding_window: a query at position i sees keys at positions > i - sliding_window; an int or
            a traced int32 scalar (it is data to the kernel), None for full attention.
        sm_scale: logit scale (default H ** -0.5).
        soft_cap: logits become soft_cap * tanh(logits / soft_cap).
        q_block: query tokens per program of a prefill chunk (decodes: one token per program).
        max_prefill_seqs: most sequences with more than one query (None: any).
        pages_per_block: pages per compute block (one double-buffered copy).
        interpret: False, True or a `pltpu.InterpretParams` (True: default parameters) to run the
            kernel in the TPU interpreter (on CPU).
        k_scale, v_scale: the f32 scales of 8-bit caches, [P, 1, K, page] or [L, P, 1, K, page]
            (`kv_quant.QuantizedPages`: key = values * scale per token and KV head); None for
            float caches.

    Raises:
        ValueError: on inconsistent shapes or block sizes.
    """
    T, N, H = q.shape
    scales = () if k_scale is None and v_scale is None else (k_scale, v_scale)
    if layer is None:  # a unit leading axis: a free reshape, one kernel for both cache layouts
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
        scales = tuple(x[None] for x in scales)
    _, _, page_size, K, H_kv = k_cache.shape
    if H_kv != H or N % K or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {q.shape} does not fit the caches {k_cache.shape}, {v_cache.shape}")
    if scales and any(x is None or x.shape != scale_shape(k_cache.shape) for x in scales):
        raise ValueError(f"8-bit caches need both scales, shaped {scale_shape(k_cache.shape)}")
    if q_block < 1 or pages_per_block < 1 or (isinstance(sliding_window, int) and sliding_window < 1):
        raise ValueError(f"block sizes and the window must be positive: {q_block=}, {pages_per_block=}, "
                         f"{sliding_window=}")
    out = None
    for rows, layout in block_layouts(cu_q_lens, num_seqs, T, q_block, max_prefill_seqs):
        Gp = padded_group(N // K, rows)
        blocks = pack_queries(q, kv_lens, cu_q_lens, num_seqs, num_kv_heads=K, q_block=rows, padded_group=Gp,
                              layout=layout)
        part = _attend_blocks(blocks, k_cache, v_cache, page_table, layer, padded_group=Gp,
                              pages_per_block=pages_per_block, sm_scale=H ** -0.5 if sm_scale is None else sm_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                              scales=scales)
        out = unpack_outputs(part, blocks, T, N, q.dtype, into=out)
    return out
