"""A KV cache stored in 8 bits: int8 (or float8 e4m3) values with a float32 scale per token and KV head.

    values [L, P, page_size, K, H]  int8 / float8_e4m3fn
    scale  [L, P, 1, K, page_size]  float32:  key[p, t, k, h] = values[p, t, k, h] * scale[p, 0, k, t]

`write_kv` quantizes each new token's key and value per KV head (absmax / qmax, rounded to the
nearest step, clipped), and writes values and scale to the same slot; attention dequantizes what it
gathers (the jnp reference through `QuantizedPages.__getitem__`, so gathering a page from it reads
8-bit values and gives float keys [.., page_size, K, H]). One scale per token and head keeps a
page's tokens independent: a prefix-cached page, a preempted request's recomputed page and a page
written one token at a time hold exactly what they would hold written any other way.

The scales of a page are stored as a [K, page_size] tile, the page's tokens on the minor axis:
  * a TPU tiles the two minor axes of an array by (8, 128). Stored [page_size, K], a token's K
    scales would take a whole 128-lane row (512 bytes: as many as its 8-bit values at K = 4,
    H = 128), and the Mosaic kernel would copy such rows for every KV head. [K, page_size] pads K
    to whole 8-sublane tiles and page_size to 128 lanes (8 bytes a token and head at page_size
    64), and one KV head's scales of a page are one [1, page_size] row: keys on lanes, as the
    kernel's scores [queries, keys] hold them.
  * the GPU kernel gathers one KV head's scales of consecutive tokens from consecutive addresses.
  * the unit axis keeps K fourth, where the values have it, so every sharding rule written for
    [L, P, page, K, H] places the scales with their values (axis i of the scale splits like axis i
    of the values: `sharding.attention.cache_specs`, `sharding.rules.kv_cache_sharding`).

Queries, keys and values are rotated by a fixed orthogonal matrix before the 8-bit pages (and the
output rotated back, `rotation`): attention is unchanged, but a key channel of outsized values no
longer sets every other channel's step. On SmolLM2 it took the fixture prompts whose 32 greedy
tokens equal HF's from 5 of 9 to 8 of 9.

Bytes per token and head: H + 4 (scale) against 2H for bfloat16 and 4H for float32, so a byte
budget holds 2H / (H + 4) times the bfloat16 tokens (1.88x at H = 64, 1.97x at H = 256) and twice
that of float32.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # "auto": the model's dtype
# float32 scales: with float16 ones (2 bytes fewer per token and head) SmolLM2's greedy tokens left
# HF's on 2 of the 9 fixture prompts instead of 1 (benchmarks/quality.py measures the rest)
SCALE_DTYPE = jnp.float32


def storage_dtype(kv_cache_dtype: str):
    return {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kv_cache_dtype]


def _qmax(dtype) -> float:
    return 127.0 if jnp.dtype(dtype) == jnp.int8 else float(jnp.finfo(dtype).max)


def scale_shape(shape) -> tuple:
    """The scale array of 8-bit pages of `shape` [..., P, page_size, K, H]: [..., P, 1, K, page_size]."""
    *lead, page_size, K, _ = shape
    return (*lead, 1, K, page_size)


def _leading(index, num_axes: int) -> tuple:
    """`index` as a tuple of at most `num_axes` entries (a bare index is one)."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > num_axes or any(i is Ellipsis or i is None for i in index):
        raise IndexError(f"8-bit pages are indexed on their {num_axes} leading (layer / page) axes only, got {index}")
    return index


@flax.struct.dataclass
class QuantizedPages:
    """8-bit KV pages and their per-token, per-head scales; indexed like the float pages they stand
    for (`pages[layer, page_ids]` gathers values and scales and returns float keys)."""

    values: jax.Array  # [..., P, page_size, K, H] 8-bit
    scale: jax.Array  # [..., P, 1, K, page_size] SCALE_DTYPE (the module docstring says why)
    compute_dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self):
        return self.values.shape

    @property
    def ndim(self):
        return self.values.ndim

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def __getitem__(self, index) -> jax.Array:
        """Dequantized pages at `index`, which indexes the axes before the page's slots only
        (layer and page of a stacked cache, page of one layer's): [..., page_size, K, H]."""
        index = _leading(index, self.ndim - 3)
        values = self.values[index].astype(jnp.float32)
        scale = jnp.swapaxes(self.scale[index][..., 0, :, :], -1, -2)  # [..., page_size, K]
        return (values * scale[..., None].astype(jnp.float32)).astype(self.compute_dtype)

    @classmethod
    def zeros(cls, shape, kv_cache_dtype: str, compute_dtype) -> QuantizedPages:
        return cls(values=jnp.zeros(shape, storage_dtype(kv_cache_dtype)),
                   scale=jnp.ones(scale_shape(shape), SCALE_DTYPE), compute_dtype=jnp.dtype(compute_dtype))


def quantize_kv(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (values [..., H] in `dtype`, scale [...] in SCALE_DTYPE): absmax per row over H.
    The scale is rounded to its stored dtype first and the values quantized with that rounded
    scale, so values * scale is the best the stored scale allows."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    qmax = _qmax(dtype)
    scale = (amax / qmax).astype(SCALE_DTYPE)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))  # all-zero rows (and underflow): any scale
    y = x32 / scale.astype(jnp.float32)[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        y = jnp.round(y)
    return jnp.clip(y, -qmax, qmax).astype(dtype), scale


def write_quantized(pages: QuantizedPages, x: jax.Array, index) -> QuantizedPages:
    """`pages` with rows `x` [T, K, H] quantized and scattered to `index`: indices of the leading
    axes down to the page's slot ((page, slot) or (layer, page, slot), each [T] or a scalar)."""
    index = _leading(index, pages.ndim - 2)
    values, scale = quantize_kv(x, pages.values.dtype)
    # (.., page, slot) -> (.., page, 0, :, slot): the advanced indices are split by the slice, so
    # the target is [T, K], the shape of `scale`
    new_values = pages.values.at[index].set(values)
    if jnp.ndim(index[-1]) == 1 and index[-1].shape[0] == 1:
        # One token (a batch-1 decode step): its scale is written twice to the same slot. A
        # one-row scatter becomes a dynamic-update-slice, which XLA:CPU fuses into the attention's
        # small gather of the same scales and then copies the whole scale pool, twice per layer
        # and cache (SmolLM2, 1 GiB pool: 0.8 tok/s against 25 for float pages); a two-row scatter
        # stays an in-place scatter (26 tok/s).
        index = tuple(jnp.concatenate([i, i]) if jnp.ndim(i) == 1 else i for i in index)
        scale = jnp.concatenate([scale, scale])
    scale_index = (*index[:-1], 0, slice(None), index[-1])
    return pages.replace(values=new_values, scale=pages.scale.at[scale_index].set(scale))


def bytes_per_token_head(head_dim: int, kv_cache_dtype: str, model_dtype) -> int:
    """Bytes one token's key (or value) of one KV head takes in the cache."""
    if kv_cache_dtype in (None, "auto"):
        return head_dim * jnp.dtype(model_dtype).itemsize
    return head_dim * jnp.dtype(storage_dtype(kv_cache_dtype)).itemsize + jnp.dtype(SCALE_DTYPE).itemsize


def rotation(head_dim: int):
    """An orthogonal [H, H] matrix applied to queries, keys and values before 8-bit pages
    (and its transpose to the attention output): q.k and the weighted sum of values are unchanged,
    while a channel of outsized keys (common in trained models) is spread over all channels, so one
    scale per token and head fits every channel (the rotation of QuaRot / SpinQuant). A normalised
    Walsh-Hadamard matrix for power-of-two H; otherwise a fixed random orthogonal one."""
    import numpy as np

    if head_dim & (head_dim - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < head_dim:
            h = np.block([[h, h], [h, -h]])
        return (h / np.sqrt(head_dim)).astype(np.float32)
    q, r = np.linalg.qr(np.random.default_rng(0).normal(size=(head_dim, head_dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def rotate(x: jax.Array, transpose: bool = False) -> jax.Array:
    """x [..., H] @ rotation(H) (or its transpose), in float32, back in x's dtype."""
    r = jnp.asarray(rotation(x.shape[-1]))
    return (x.astype(jnp.float32) @ (r.T if transpose else r)).astype(x.dtype)
