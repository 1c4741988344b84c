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


def query_blocks(cu_q_lens, num_seqs, num_tokens: int, q_block: int):
    """Splits each sequence's queries into blocks of `q_block` rows.

    Returns (seq [NB], rows [NB, q_block], row_valid [NB, q_block]) with NB a static bound:
    num_tokens when q_block == 1, else ceil(num_tokens / q_block) + number of sequence slots.
    """
    S = cu_q_lens.shape[0] - 1
    q_lens = jnp.where(jnp.arange(S) < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    num_blocks = num_tokens if q_block == 1 else -(-num_tokens // q_block) + S
    per_seq = (q_lens + q_block - 1) // q_block
    ends = jnp.cumsum(per_seq)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, b, side="right"), S - 1).astype(jnp.int32)
    local = b - (ends[seq] - per_seq[seq])
    rows = (cu_q_lens[seq] + local * q_block)[:, None] + jnp.arange(q_block, dtype=jnp.int32)[None]
    row_valid = (b < ends[-1])[:, None] & (rows < cu_q_lens[seq + 1][:, None])
    return seq, rows, row_valid


def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                                     sliding_window: int | None = None, layer=None, q_block: int = 1):
    """Causal GQA attention of a ragged batch over paged K/V. Returns [T, N, H] (zeros for padding).

    q: [T, N, H]; k_pages, v_pages: [P, page_size, K, H], or [L, P, page_size, K, H] read at
    `layer`; kv_lens: [S] int32 (tokens in the cache, this step's included); page_table:
    [S, max_pages] int32; cu_q_lens: [S + 1] int32 cumulative query lengths; num_seqs: scalar
    int32, sequences in use (rows past it are padding); q_block: static query rows per block.
    """
    T, N, H = q.shape
    page_size, K = k_pages.shape[-3:-1]
    max_pages = page_table.shape[1]
    seq, rows, row_valid = query_blocks(cu_q_lens, num_seqs, T, q_block)
    NB = seq.shape[0]
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
    scores = jnp.einsum("BQKGH,BSKH->BKGQS", qb, keys, preferred_element_type=jnp.float32) * (H ** -0.5)
    k_pos = jnp.arange(max_pages * page_size, dtype=jnp.int32)
    mask = (k_pos[None, None, :] <= pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[seq][:, None, None])
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("BKGQS,BSKH->BQKGH", probs, values, preferred_element_type=jnp.float32)
    out = jnp.where(row_valid[:, :, None, None, None], out, 0.0).reshape(NB * q_block, N, H)
    dest = jnp.where(row_valid, rows, T).reshape(-1)  # invalid rows land out of range and are dropped
    return jnp.zeros((T, N, H), jnp.float32).at[dest].set(out, mode="drop").astype(q.dtype)
