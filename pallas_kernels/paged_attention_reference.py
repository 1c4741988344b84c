"""Ragged paged attention in plain jnp: the reference every Pallas kernel is tested against, and
the implementation the CPU backend runs.

The cache is a pool of pages; a sequence's keys live in the pages its page-table row lists, token
j of the sequence at page_table[s, j // page_size], slot j % page_size:

    k_pages [P, page_size, K, H] (or [L, P, page_size, K, H] with `layer`)
    page_table [S, max_pages]     kv_lens [S]
    q [T, N, H]: the step's tokens of all sequences back to back (ragged), sequence s owning
    q[cu_q_lens[s] : cu_q_lens[s+1]]; tokens past cu_q_lens[num_seqs] are padding.

Sequence s's new tokens are its last q_len_s tokens, so token i of its chunk sits at position
kv_lens[s] - q_len_s + i and attends causally to keys 0..that position (within the sliding
window, if any). The chunk's own K/V must be written first (`write_kv`).

Queries are processed in blocks of `q_block` rows that never straddle two sequences; each block
gathers its sequence's pages once. q_block=1 (decode steps) gathers per token; a prefill chunk of
n tokens with q_block=32 gathers its pages n/32 times instead of n times (measured on XLA:CPU,
SmolLM2, a 512-token chunk: 4.5 s per step per-token vs docs/BENCHMARKS.md for blocked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(k_pages, v_pages, k, v, slot_mapping, layer=None):
    """Scatters new keys/values into their slots.

    k_pages, v_pages: [P, page_size, K, H], or [L, P, page_size, K, H] with `layer` (the write then
    goes straight into the stacked cache, no per-layer copy); k, v: [T, K, H]; slot_mapping: [T]
    int32 flat slot (page * page_size + offset). Padding tokens point at the null page 0 and write
    harmlessly there.
    """
    page_size = k_pages.shape[-3]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    index = (page, offset) if layer is None else (layer, page, offset)
    return (k_pages.at[index].set(k.astype(k_pages.dtype)), v_pages.at[index].set(v.astype(v_pages.dtype)))


def query_blocks(cu_q_lens, num_seqs, num_tokens: int, q_block: int, *, min_q_len: int = 1,
                 max_seqs: int | None = None):
    """Splits the queries of each sequence with at least `min_q_len` of them into blocks of
    `q_block` rows.

    Returns (seq [NB], rows [NB, q_block], row_valid [NB, q_block]) with NB a static bound:
    num_tokens when q_block == 1, else ceil(num_tokens / q_block) plus one partial block per
    sequence that can have one (`max_seqs` of them, default every sequence slot).
    """
    S = cu_q_lens.shape[0] - 1
    q_lens = jnp.where(jnp.arange(S) < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    q_lens = jnp.where(q_lens >= min_q_len, q_lens, 0)
    num_blocks = num_tokens if q_block == 1 else -(-num_tokens // q_block) + min(S, max_seqs or S)
    per_seq = (q_lens + q_block - 1) // q_block
    ends = jnp.cumsum(per_seq)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # compare_all: one fused comparison; the default binary search is a while loop, which on GPU
    # syncs with the host every iteration (~7 round trips for 100 sequences).
    seq = jnp.minimum(jnp.searchsorted(ends, b, side="right", method="compare_all"), S - 1).astype(jnp.int32)
    local = b - (ends[seq] - per_seq[seq])
    rows = (cu_q_lens[seq] + local * q_block)[:, None] + jnp.arange(q_block, dtype=jnp.int32)[None]
    row_valid = (b < ends[-1])[:, None] & (rows < cu_q_lens[seq + 1][:, None])
    return seq, rows, row_valid


def single_token_rows(cu_q_lens, num_seqs):
    """One block per sequence slot holding its query if the sequence has exactly one (a decode):
    (seq [S], rows [S, 1], row_valid [S, 1])."""
    S = cu_q_lens.shape[0] - 1
    seq = jnp.arange(S, dtype=jnp.int32)
    valid = (seq < num_seqs) & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)
    return seq, cu_q_lens[:-1][:, None], valid[:, None]


def block_layouts(cu_q_lens, num_seqs, num_tokens: int, q_block: int, max_prefill_seqs: int | None = None):
    """How a ragged batch splits into query blocks: [(tokens per block, layout)], layouts as from
    `query_blocks`. q_block == 1: every token is a block ((1, None): block b is token b). Larger:
    the single-query sequences (decodes) one per block, then the others (at most
    `max_prefill_seqs`; None: any) in blocks of q_block tokens, so no decode pays for a prefill
    block's rows. The reference and both kernels split batches this way."""
    if q_block == 1:
        return [(1, None)]
    return [(1, single_token_rows(cu_q_lens, num_seqs)),
            (q_block, query_blocks(cu_q_lens, num_seqs, num_tokens, q_block, min_q_len=2,
                                   max_seqs=max_prefill_seqs))]


def _logits(q, keys, eq, *, sm_scale, soft_cap):
    """Scaled (and soft-capped: cap * tanh(s / cap)) attention logits in f32."""
    scores = jnp.einsum(eq, q, keys, preferred_element_type=jnp.float32) * sm_scale
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def _attend_blocks(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, blocks, *, layer, sliding_window,
                   sm_scale, soft_cap):
    """Attention of query blocks (from query_blocks) over their sequences' pages.
    Returns (out [NB * q_block, N, H] f32, destination row of each, T where invalid)."""
    T, N, H = q.shape
    page_size, K = k_pages.shape[-3:-1]
    max_pages = page_table.shape[1]
    seq, rows, row_valid = blocks
    NB, q_block = rows.shape
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = (kv_lens[seq] - q_len)[:, None] + (rows - cu_q_lens[seq][:, None])  # [NB, Bq] query positions

    pages = page_table[seq]  # [NB, max_pages]
    if layer is not None:  # gathered from the stacked cache without slicing the layer out first
        keys, values = k_pages[layer, pages], v_pages[layer, pages]
    else:
        keys, values = k_pages[pages], v_pages[pages]
    keys = keys.reshape(NB, max_pages * page_size, K, H)
    values = values.reshape(NB, max_pages * page_size, K, H)
    qb = q[jnp.minimum(rows, T - 1)].reshape(NB, q_block, K, N // K, H)
    scores = _logits(qb, keys, "BQKGH,BSKH->BKGQS", sm_scale=sm_scale, soft_cap=soft_cap)
    k_pos = jnp.arange(max_pages * page_size, dtype=jnp.int32)
    # Slots past a sequence's end may hold anything (NaN included): 0 * NaN would leak through probs @ V.
    values = jnp.where((k_pos[None, :] < kv_lens[seq][:, None])[:, :, None, None], values, 0)
    mask = (k_pos[None, None, :] <= pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[seq][:, None, None])
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("BKGQS,BSKH->BQKGH", probs, values, preferred_element_type=jnp.float32)
    out = jnp.where(row_valid[:, :, None, None, None], out, 0.0).reshape(NB * q_block, N, H)
    return out, jnp.where(row_valid, rows, T).reshape(-1)


def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                                     sliding_window: int | None = None, layer=None, q_block: int = 1,
                                     max_prefill_seqs: int | None = None, sm_scale: float | None = None,
                                     soft_cap: float | None = None):
    """Causal GQA attention of a ragged batch over paged K/V. Returns [T, N, H] (zeros for padding).

    q: [T, N, H]; k_pages, v_pages: [P, page_size, K, H], or [L, P, page_size, K, H] read at
    `layer`; kv_lens: [S] int32 (tokens in the cache, this step's included); page_table:
    [S, max_pages] int32; cu_q_lens: [S + 1] int32 cumulative query lengths; num_seqs: scalar
    int32, sequences in use (rows past it are padding).

    q_block (static): 1 attends per token. Larger: sequences with one query (decodes) attend per
    token and sequences with more (prefill chunks) in blocks of q_block rows, of which there are
    at most ceil(T / q_block) + max_prefill_seqs (the caller guarantees at most that many
    multi-token sequences; None: every sequence slot may be one).
    sm_scale: logit scale (default H ** -0.5); soft_cap: logits become cap * tanh(logits / cap).
    """
    T, N, H = q.shape
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    common = dict(layer=layer, sliding_window=sliding_window, sm_scale=sm_scale, soft_cap=soft_cap)
    result = jnp.zeros((T, N, H), jnp.float32)
    for _, layout in block_layouts(cu_q_lens, num_seqs, T, q_block, max_prefill_seqs):
        blocks = layout or query_blocks(cu_q_lens, num_seqs, T, 1)
        out, dest = _attend_blocks(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, blocks, **common)
        result = result.at[dest].set(out, mode="drop")  # invalid rows land out of range and are dropped
    return result.astype(q.dtype)


def decode_attention_by_pages(q, k_pages, v_pages, kv_lens, item_seq, item_pages, item_pos, *, layer=None,
                              sliding_window: int | None = None, sm_scale: float | None = None,
                              soft_cap: float | None = None, tree_base=None, tree_mask=None):
    """Decode attention (one query per sequence) over a flat list of (sequence, pages) work items.

    Every sequence's pages are listed once, in groups of a few pages per item, so the work is the
    sum of the sequences' lengths rather than the longest one times the batch (what a padded page
    table costs):

        item i: sequence item_seq[i] reads pages item_pages[i, :], the first token at item_pos[i]

    q: [S, N, H] (query s at position kv_lens[s] - 1); kv_lens: [S]; item_seq, item_pos: [I]
    int32; item_pages: [I, pages_per_item] int32 (a group's pages past the sequence's end, and
    padding items, point at the null page and are masked by position; padding items have
    item_pos past every length). A softmax over each sequence's items combines the groups
    (segment max and sums). Returns [S, N, H] (zeros for sequences without items).
    """
    S, N, H = q.shape
    page_size, K = k_pages.shape[-3:-1]
    G = N // K
    I, group = item_pages.shape
    if layer is not None:
        keys, values = k_pages[layer, item_pages], v_pages[layer, item_pages]  # [I, group, page, K, H]
    else:
        keys, values = k_pages[item_pages], v_pages[item_pages]
    keys = keys.reshape(I, group * page_size, K, H)
    values = values.reshape(I, group * page_size, K, H)
    qi = q.reshape(S, K, G, H)[item_seq]  # [I, K, G, H]
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    scores = _logits(qi, keys, "IKGH,IPKH->IKGP", sm_scale=sm_scale, soft_cap=soft_cap)
    k_pos = item_pos[:, None] + jnp.arange(group * page_size, dtype=jnp.int32)[None]  # [I, P]
    q_pos = kv_lens[item_seq] - 1
    mask = k_pos <= q_pos[:, None]
    if tree_mask is not None:
        base, bits = tree_base[item_seq][:, None], tree_mask[item_seq]
        offset = k_pos - base
        seen = (jnp.right_shift(bits[:, None], jnp.clip(offset, 0, 31)) & 1) == 1
        mask &= (bits[:, None] == -1) | (offset < 0) | ((offset < 32) & seen)
        own = jnp.where(bits == -1, q_pos, base[:, 0] + jax.lax.population_count(bits) - 1)
        q_pos = jnp.where(bits == -1, q_pos, own)  # (the sliding window ends at its own position)
    values = jnp.where(mask[:, :, None, None], values, 0)  # slots past the end may hold NaN
    if sliding_window is not None:
        mask &= k_pos > q_pos[:, None] - sliding_window
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    segments = dict(num_segments=S, indices_are_sorted=True)
    row_max = jax.ops.segment_max(scores.max(-1), item_seq, **segments)  # [S, K, G]
    e = jnp.where(mask, jnp.exp(scores - row_max[item_seq][..., None]), 0.0)
    denom = jax.ops.segment_sum(e.sum(-1), item_seq, **segments)
    numer = jax.ops.segment_sum(
        jnp.einsum("IKGP,IPKH->IKGH", e.astype(values.dtype), values, preferred_element_type=jnp.float32),
        item_seq, **segments)
    out = jnp.where(denom[..., None] > 0, numer / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    return out.reshape(S, N, H).astype(q.dtype)


def decode_items(kv_lens, page_table, page_size: int, num_items: int, pages_per_item: int = 1):
    """Host-side (numpy) work items for `decode_attention_by_pages`: every sequence's pages in
    groups of `pages_per_item`, sequences in order, padded to `num_items`.
    Returns (item_seq [I], item_pages [I, pages_per_item], item_pos [I]) int32 arrays."""
    import numpy as np

    page_table = np.asarray(page_table)
    pages = -(-np.asarray(kv_lens) // page_size)
    groups = -(-pages // pages_per_item)
    n = int(groups.sum())
    if n > num_items:
        raise ValueError(f"{n} page groups exceed the {num_items} work items of this step shape")
    seq = np.repeat(np.arange(len(groups), dtype=np.int32), groups)
    g = np.arange(n, dtype=np.int32) - np.repeat(np.cumsum(groups) - groups, groups).astype(np.int32)
    j = g[:, None] * pages_per_item + np.arange(pages_per_item, dtype=np.int32)[None]  # [n, group]
    padded = np.zeros((page_table.shape[0], page_table.shape[1] + pages_per_item), np.int32)
    padded[:, :page_table.shape[1]] = page_table
    in_seq = j < pages[seq][:, None]
    item_seq = np.zeros(num_items, np.int32)
    item_pages = np.zeros((num_items, pages_per_item), np.int32)
    item_pos = np.full(num_items, np.iinfo(np.int32).max // 2, np.int32)
    item_seq[:n] = seq
    item_pages[:n] = np.where(in_seq, padded[seq[:, None], j], 0)
    item_pos[:n] = g * pages_per_item * page_size
    return item_seq, item_pages, item_pos


def ragged_rows_as_decodes(kv_lens, page_table, cu_q_lens, num_tokens: int, page_size: int):
    """A ragged step's query rows as one-query decodes, on the device: row r of chunk s (rows
    cu_q_lens[s] .. cu_q_lens[s + 1] - 1, the last at position kv_lens[s] - 1) sits at position
    kv_lens[s] - cu_q_lens[s + 1] + r and reads its chunk's pages up to there. The items are row
    major, W a row (W: the page table's width), those past a row's position (and padding rows')
    masked by position, so `decode_attention_by_pages` gives each row what causal attention over
    its sequence gives it.

    Returns (row_kv_lens [T], item_seq [T W], item_pages [T W, 1], item_pos [T W]) int32.
    """
    S, W = page_table.shape
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, rows, side="right").astype(jnp.int32) - 1, 0, S - 1)
    real = rows < cu_q_lens[-1]  # (cu_q_lens past the last chunk repeat the total)
    row_lens = jnp.where(real, kv_lens[seq] - cu_q_lens[seq + 1] + rows + 1, 0)
    first = jnp.arange(W, dtype=jnp.int32) * page_size
    item_pos = jnp.where(first[None] < row_lens[:, None], first[None], jnp.iinfo(jnp.int32).max // 2)
    return (row_lens.astype(jnp.int32), jnp.repeat(rows, W), page_table[seq].reshape(-1, 1).astype(jnp.int32),
            item_pos.reshape(-1).astype(jnp.int32))


NEG_LSE = -1e30  # log-sum-exp of a query that sees no key here


def ragged_paged_attention_partial(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, stripe,
                                   num_stripes: int, layer=None, sliding_window: int | None = None,
                                   sm_scale: float | None = None, soft_cap: float | None = None):
    """Attention of every query over one stripe of the KV pool only: the sequence-parallel
    building block. Stripe `stripe` (traced) of `num_stripes` holds pool pages
    [stripe * P_local, (stripe + 1) * P_local) in k_pages / v_pages, and of every sequence the
    pages j with j % num_stripes == stripe (`jaxinfer.cache.BlockPool` stripes), so only those
    page-table columns are read: the work divides by the number of stripes.

    Returns (out [T, N, H] f32 normalised over this stripe's keys, lse [T, N] f32, NEG_LSE where
    the stripe holds none of a query's keys). Stripes combine exactly by log-sum-exp weights.
    """
    T, N, H = q.shape
    P_local, page_size, K = k_pages.shape[-4], k_pages.shape[-3], k_pages.shape[-2]
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    seq, rows, row_valid = query_blocks(cu_q_lens, num_seqs, T, 1)
    rows, row_valid = rows[:, 0], row_valid[:, 0]  # one query per block
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])  # [T]
    max_pages = page_table.shape[1]
    cols = stripe + num_stripes * jnp.arange(-(-max_pages // num_stripes), dtype=jnp.int32)  # this stripe's columns
    local = page_table[seq][:, jnp.minimum(cols, max_pages - 1)] - stripe * P_local  # [T, C]
    here = (local >= 0) & (local < P_local) & (cols < max_pages)[None]
    local = jnp.clip(local, 0, P_local - 1)
    keys = k_pages[layer, local] if layer is not None else k_pages[local]  # [T, C, page, K, H]
    values = v_pages[layer, local] if layer is not None else v_pages[local]
    W = local.shape[1] * page_size
    keys, values = keys.reshape(T, W, K, H), values.reshape(T, W, K, H)
    k_pos = (cols[:, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)[None]).reshape(W)
    mask = (jnp.repeat(here, page_size, axis=1) & (k_pos[None] <= pos[:, None])
            & (k_pos[None] < kv_lens[seq][:, None]) & row_valid[:, None])
    if sliding_window is not None:
        mask &= k_pos[None] > pos[:, None] - sliding_window
    values = jnp.where(mask[:, :, None, None], values, 0)
    scores = _logits(q.reshape(T, K, N // K, H), keys, "TKGH,TWKH->TKGW", sm_scale=sm_scale, soft_cap=soft_cap)
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask[:, None, None, :], jnp.exp(scores - m), 0.0)
    denom = e.sum(-1)  # [T, K, G]
    out = jnp.einsum("TKGW,TWKH->TKGH", e.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = jnp.where(denom[..., None] > 0, out / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(denom > 0, m[..., 0] + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_LSE)
    return out.reshape(T, N, H), lse.reshape(T, N)
