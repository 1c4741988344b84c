"""Model configuration: one frozen dataclass that fully describes a decoder's shape.

Built from checkpoint metadata (`checkpoints.gguf`) or by hand for tests (`jaxinfer.testing`).
Never mutated: derive variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling ("llama3" rope_type in HF configs).

    Attributes:
      factor: how much the context was stretched (8.0 for Llama 3.1).
      low_freq_factor: wavelengths longer than original_max / low_freq_factor are divided by factor.
      high_freq_factor: wavelengths shorter than original_max / high_freq_factor are kept.
      original_max_position_embeddings: the context length the base model was trained at.
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"RopeScaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2).

    Attributes:
      arch: architecture family, one of SUPPORTED_ARCHITECTURES.
      vocab_size: V, rows of the token embedding.
      hidden_size: D, the residual stream width.
      intermediate_size: F, the SwiGLU hidden width.
      num_layers: L, decoder blocks (stacked on the leading parameter axis).
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads; N % K == 0 (K == N is MHA, K == 1 is MQA).
      head_dim: H, width of one head (usually D // N).
      rms_norm_eps: epsilon inside every RMSNorm.
      rope_theta: RoPE base frequency.
      rope_scaling: Llama 3 RoPE scaling, or None.
      rope_freq_factors: per-frequency divisors of the inverse frequencies [H // 2], as llama.cpp
        stores Llama 3 scaling (`rope_freqs.weight`); None for none.
      max_position_embeddings: the context window in tokens.
      tie_word_embeddings: the output projection reuses the token embedding.
      attention_bias: q/k/v projections carry a bias (Qwen2).
      sliding_window: Mistral-style attention window in tokens, or None for full attention.
      dtype: parameter and activation dtype ("float32" on CPU, "bfloat16" on TPU/GPU).
      scan_layers: scan over the stacked layers (compile time independent of depth) instead of
        unrolling them (faster steps on GPU/TPU: no per-layer weight slice copies).
    """

    arch: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"
    scan_layers: bool = True

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r} is not supported; use one of {SUPPORTED_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(
                f"rope_freq_factors needs head_dim // 2 = {self.head_dim // 2} entries, "
                f"got {len(self.rope_freq_factors)}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    @property
    def num_groups(self) -> int:
        """G: query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def compile_key(self) -> str:
        """A short hash of everything that changes the compiled graph."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_dtype(backend: str) -> str:
    """float32 on CPU (fast and exact there), bfloat16 on accelerators (DESIGN.md decision 8)."""
    return "float32" if backend == "cpu" else "bfloat16"


def default_scan_layers(backend: str) -> bool:
    """Scan on CPU (compile time), unroll on accelerators (step time; DESIGN.md decision 4)."""
    return backend == "cpu"
