"""Ragged paged attention in plain jnp: the reference every Pallas kernel is tested against.

One layer's cache is a pool of pages; a sequence's keys live in the pages its page-table row
lists, token j of the sequence at page_table[s, j // page_size], slot j % page_size:

    k_pages [P, page_size, K, H]      page_table [S, max_pages]     kv_lens [S]
    q [T, N, H]: the step's tokens of all sequences back to back (ragged), sequence s owning
    q[cu_q_lens[s] : cu_q_lens[s+1]]; tokens past cu_q_lens[num_seqs] are padding.

Sequence s's new tokens are its last q_len_s tokens, so token i of its chunk sits at position
kv_lens[s] - q_len_s + i and attends causally to keys 0..that position (within the sliding
window, if any). The chunk's own K/V must be written first (`write_kv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Scatters new keys/values into their slots.

    k_pages, v_pages: [P, page_size, K, H]; k, v: [T, K, H]; slot_mapping: [T] int32 flat slot
    (page * page_size + offset). Padding tokens point at the null page 0 and write harmlessly there.
    """
    P, page_size = k_pages.shape[:2]
    flat_k = k_pages.reshape(P * page_size, *k_pages.shape[2:]).at[slot_mapping].set(k.astype(k_pages.dtype))
    flat_v = v_pages.reshape(P * page_size, *v_pages.shape[2:]).at[slot_mapping].set(v.astype(v_pages.dtype))
    return flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)


def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                                     sliding_window: int | None = None):
    """Causal GQA attention of a ragged batch over paged K/V. Returns [T, N, H] (zeros for padding).

    q: [T, N, H]; k_pages, v_pages: [P, page_size, K, H]; kv_lens: [S] int32 (tokens in the cache,
    this step's included); page_table: [S, max_pages] int32; cu_q_lens: [S + 1] int32 cumulative
    query lengths; num_seqs: scalar int32, sequences in use (rows past it are padding).
    """
    T, N, H = q.shape
    _, page_size, K, _ = k_pages.shape
    max_pages = page_table.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)  # [T] owning sequence
    valid = t < cu_q_lens[num_seqs]
    seq = jnp.minimum(seq, page_table.shape[0] - 1)
    q_start, q_end = cu_q_lens[seq], cu_q_lens[seq + 1]
    pos = kv_lens[seq] - (q_end - q_start) + (t - q_start)  # [T] absolute position of each query

    keys = k_pages[page_table[seq]].reshape(T, max_pages * page_size, K, H)  # [T, S_max, K, H]
    values = v_pages[page_table[seq]].reshape(T, max_pages * page_size, K, H)
    qg = q.reshape(T, K, N // K, H)
    scores = jnp.einsum("TKGH,TSKH->TKGS", qg, keys, preferred_element_type=jnp.float32) * (H ** -0.5)
    k_pos = jnp.arange(max_pages * page_size, dtype=jnp.int32)
    mask = (k_pos[None, :] <= pos[:, None]) & (k_pos[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        mask &= k_pos[None, :] > pos[:, None] - sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("TKGS,TSKH->TKGH", probs, values, preferred_element_type=jnp.float32)
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(T, N, H).astype(q.dtype)
