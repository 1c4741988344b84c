"""Dense (non-paged) KV cache and the attention that reads it.

This is the attention behind the reference generator (`jaxinfer.reference`), the oracle the paged
engine is tested against. The model calls an `Attend` function once per layer; it writes the new
keys/values into the cache and attends over everything the cache holds for each row:

    cache.k[layer]:  row b  | pos 0 | pos 1 | ... | pos p | (stale) ... | S-1 |
                              <---- written, attended ---->  never read (masked, overwritten
                                                             before use: decode writes p+1 first)

Row b's chunk of T new tokens sits at positions start_pos[b] .. start_pos[b] + T - 1. Padding
tokens of a shorter prompt land past its end and are overwritten by its decode steps before any
query can see them, because a query at position p only reads keys at positions <= p.
"""

from __future__ import annotations

from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class DenseKVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]

    @classmethod
    def zeros(cls, *, num_layers, batch_size, max_len, num_kv_heads, head_dim, dtype) -> "DenseKVCache":
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@flax.struct.dataclass
class DenseAttentionMeta:
    start_pos: jax.Array  # [B] int32: position of the chunk's first token in each row


class Attend(Protocol):
    def __call__(self, q, k, v, kv_cache, layer, meta, *, sliding_window=None, sm_scale=None, soft_cap=None):
        """q: [B, T, N, H]; k, v: [B, T, K, H]; layer: scalar int -> (out [B, T, N, H], kv_cache).

        sliding_window: None (full attention), an int, or a traced int32 scalar (the layer's window
        under a scanned layer loop); a query at p sees keys in (p - window, p]. sm_scale: the logit
        scale (None: H ** -0.5). soft_cap: logits become cap * tanh(logits / cap) (None: off).
        """


def dense_attend(q, k, v, kv_cache: DenseKVCache, layer, meta: DenseAttentionMeta, *,
                 sliding_window=None, sm_scale: float | None = None, soft_cap: float | None = None):
    """Writes k/v of the chunk into `kv_cache` at `layer`, then causal attention over the cache."""
    B, T, N, H = q.shape
    K = k.shape[2]
    S = kv_cache.k.shape[2]
    q_pos = meta.start_pos[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    new_k = kv_cache.k.at[layer, rows, q_pos].set(k.astype(kv_cache.k.dtype), mode="drop")
    new_v = kv_cache.v.at[layer, rows, q_pos].set(v.astype(kv_cache.v.dtype), mode="drop")
    keys, values = new_k[layer], new_v[layer]  # [B, S, K, H]

    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5 if sm_scale is None else sm_scale)
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    k_pos = jnp.arange(S, dtype=jnp.int32)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype), DenseKVCache(k=new_k, v=new_v)
