"""Packing a ragged batch of queries into fixed-size work blocks for the Pallas kernels, and back.

A step's queries arrive ragged: [T, N, H], sequence s owning rows cu_q_lens[s]:cu_q_lens[s+1].
The kernels want uniform blocks whose rows all belong to one sequence and one KV head, so that
every KV page a block reads is read once for all the query heads that share it (GQA):

    q [T, N, H]                                  blocks.q [NB, K, q_block * Gp, H]
    seq a: 5 tokens | seq b: 1 | seq c: 3  ->    block 0: a tokens 0..3   (q_block = 4)
                                                 block 1: a token 4 + 3 padding rows
                                                 block 2: b token 0 + 3 padding rows
                                                 block 3: c tokens 0..2 + 1 padding row
                                                 block 4..NB-1: padding blocks (num_rows 0)

Row r of a block is token r // Gp, query head g = r % Gp of the KV head; the G query heads are
padded to Gp (>= G) where the hardware wants more rows (Triton's dot needs 16; TPU sublanes 8).
NB = ceil(T / q_block) + S is a static bound: each sequence adds at most one partial block.

Per block the kernels get scalars: the sequence, the position of its first query, its number of
valid query rows (tokens) and its sequence's KV length. Query row i of block b sits at position
first_pos[b] + i and attends to keys 0..first_pos[b] + i (within the sliding window, if any).
The packing is a gather of q and the unpacking a scatter of the output: both are q-sized, small
next to the KV reads.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention_reference import query_blocks


@flax.struct.dataclass
class QueryBlocks:
    q: jax.Array  # [NB, K, q_block * Gp, H]
    seq: jax.Array  # [NB] int32: the block's sequence (padding blocks: any valid index)
    first_pos: jax.Array  # [NB] int32: position of the block's first query token
    num_rows: jax.Array  # [NB] int32: valid query tokens in the block (0: padding block)
    kv_len: jax.Array  # [NB] int32: tokens in the cache for the block's sequence
    dest: jax.Array  # [NB, q_block] int32: output row of each block token (T where invalid)
    rows_are_tokens: bool = flax.struct.field(pytree_node=False, default=False)  # block b is token b


def num_blocks(num_tokens: int, num_seqs: int, q_block: int) -> int:
    """Static bound on the blocks of a ragged batch."""
    return num_tokens if q_block == 1 else -(-num_tokens // q_block) + num_seqs


def pack_queries(q, kv_lens, cu_q_lens, num_seqs, *, num_kv_heads: int, q_block: int,
                 padded_group: int, layout=None) -> QueryBlocks:
    """Splits the ragged queries q [T, N, H] into blocks (see the module docstring).

    layout: (seq [NB], rows [NB, q_block], row_valid [NB, q_block]) from
    `paged_attention_reference.query_blocks` or `single_token_rows`, to pack a subset of the
    sequences; default: every sequence in blocks of q_block.
    """
    T, N, H = q.shape
    K, G, Gp = num_kv_heads, N // num_kv_heads, padded_group
    S = cu_q_lens.shape[0] - 1
    rows_are_tokens = layout is None and q_block == 1
    seq, rows, row_valid = layout or query_blocks(cu_q_lens, num_seqs, T, q_block, max_seqs=S)
    NB, q_block = rows.shape
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    first_pos = kv_lens[seq] - q_len + (rows[:, 0] - cu_q_lens[seq])
    num_rows = row_valid.sum(axis=1).astype(jnp.int32)
    # With one token per block, block b is token b: a reshape, not a gather (decode steps).
    qb = q[:, None] if rows_are_tokens else q[jnp.minimum(rows, T - 1)]  # [NB, Bq, N, H]
    qb = jnp.where(row_valid[:, :, None, None], qb, 0).reshape(NB, q_block, K, G, H)
    if Gp > G:
        qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, Gp - G), (0, 0)))
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(NB, K, q_block * Gp, H)
    return QueryBlocks(q=qb, seq=seq, first_pos=first_pos.astype(jnp.int32), num_rows=num_rows,
                       kv_len=jnp.where(num_rows > 0, kv_lens[seq], 0).astype(jnp.int32),
                       dest=jnp.where(row_valid, rows, T).astype(jnp.int32), rows_are_tokens=rows_are_tokens)


def unpack_outputs(out, blocks: QueryBlocks, num_tokens: int, num_heads: int, dtype, into=None):
    """out [NB, K, q_block * Gp, H] -> [T, N, H] (zeros for padding tokens), or scattered `into`
    an earlier part's result."""
    NB, K, R, H = out.shape
    q_block = blocks.dest.shape[1]
    Gp, G = R // q_block, num_heads // K
    out = out.reshape(NB, K, q_block, Gp, H)[:, :, :, :G].transpose(0, 2, 1, 3, 4)
    out = out.reshape(NB * q_block, num_heads, H)
    if blocks.rows_are_tokens and into is None:  # block b is token b
        return jnp.where((blocks.dest[:, 0] < num_tokens)[:, None, None], out, 0).astype(dtype)
    result = jnp.zeros((num_tokens, num_heads, H), dtype) if into is None else into
    return result.at[blocks.dest.reshape(-1)].set(out.astype(dtype), mode="drop")
