"""Pure functions the decoder is made of: RMSNorm, rotary embeddings, the gated MLP (SwiGLU / GeGLU).

Shapes: B batch, T tokens, D model dim, N query heads, K kv heads, H head dim, F mlp dim.
All math that is sensitive to precision (norm statistics, rotary angles, softmax) runs in float32
whatever the parameter dtype, as the reference implementations do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import RopeScaling


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x: [..., D], weight: [D] -> [..., D] in x.dtype, scaled by (offset + weight).

    Gemma stores its norm weights as offsets from one (offset=1): the sum is taken in float32, as HF
    does, so a bfloat16 weight near zero keeps its precision."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (offset + weight.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None,
                  freq_factors: tuple[float, ...] | None = None) -> np.ndarray:
    """Inverse frequencies [H // 2] (float32), with `scaling` applied when given.

    Linear scaling divides every frequency by `factor`. Llama 3 scaling keeps high frequencies,
    divides low frequencies by `factor`, and interpolates smoothly in between (the "llama3"
    rope_type of HF transformers). GGUF files store the same thing precomputed as per-frequency
    divisors (`rope_freqs.weight`): `freq_factors`.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None and scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None:
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions: [B, T] int -> (cos, sin), each [B, T, H] float32 (halves repeated, HF layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x: [B, T, heads, H] by (cos, sin): [B, T, H], in the rotate-half layout.

    The rotate-half layout pairs dimension i with i + H/2 (HF transformers, GPT-NeoX). llama.cpp
    stores Llama Q/K rows interleaved instead; the GGUF loader undoes that permutation.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,  # SwiGLU (Llama)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GeGLU (Gemma's gelu_pytorch_tanh)
}
