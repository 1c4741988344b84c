"""Model configuration: one frozen dataclass that fully describes a decoder's shape.

Built from checkpoint metadata (`checkpoints.gguf`) or by hand for tests (`jaxinfer.testing`).
Never mutated: derive variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from jaxinfer.quantization import QuantSpec

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF `layer_types` names
ROPE_TYPES = ("llama3", "linear")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE context extension, as HF configs' `rope_scaling` / `rope_parameters` describe it.

    "llama3" (Llama 3.1): frequency-dependent, low frequencies divided by `factor`, high ones kept,
    a smooth ramp between. "linear" (Gemma 3's global layers): every frequency divided by `factor`,
    i.e. positions compressed by it.

    Attributes:
      factor: how much the context was stretched (8.0 for Llama 3.1).
      rope_type: "llama3" or "linear"; the other fields apply to "llama3" only.
      low_freq_factor: wavelengths longer than original_max / low_freq_factor are divided by factor.
      high_freq_factor: wavelengths shorter than original_max / high_freq_factor are kept.
      original_max_position_embeddings: the context length the base model was trained at.
    """

    factor: float
    rope_type: str = "llama3"
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"RopeScaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a decoder: the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) and Gemma 3.

    Gemma 3 (arch "gemma3") differs from Llama in fixed ways that follow from the arch (see the
    properties below): RMSNorm weights stored as offsets from 1 (x * (1 + w)), RMSNorm of each head's
    q and k before RoPE, a norm after attention and after the MLP as well as before them, a GELU
    (tanh) gated MLP, and the embedding output scaled by sqrt(hidden_size). Its local and global
    layers are described by `layer_types`, `sliding_window` and `local_rope_theta`.

    Attributes:
      arch: architecture family, one of SUPPORTED_ARCHITECTURES.
      vocab_size: V, rows of the token embedding.
      hidden_size: D, the residual stream width.
      intermediate_size: F, the gated MLP's hidden width.
      num_layers: L, decoder blocks (stacked on the leading parameter axis).
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads; N % K == 0 (K == N is MHA, K == 1 is MQA).
      head_dim: H, width of one head (usually D // N).
      rms_norm_eps: epsilon inside every RMSNorm.
      rope_theta: RoPE base frequency (of the global layers when `layer_types` mixes kinds).
      rope_scaling: RoPE scaling, or None (global layers only when `local_rope_theta` is set).
      rope_freq_factors: per-frequency divisors of the inverse frequencies [H // 2], as llama.cpp
        stores Llama 3 scaling (`rope_freqs.weight`); None for none.
      max_position_embeddings: the context window in tokens.
      tie_word_embeddings: the output projection reuses the token embedding.
      attention_bias: q/k/v projections carry a bias (Qwen2).
      sliding_window: attention window in tokens (a query sees itself and the window - 1 keys
        before it), or None for full attention.
      layer_types: per layer, "sliding_attention" (windowed) or "full_attention", as HF configs
        name them; None: every layer windowed when `sliding_window` is set (Mistral), else full.
      local_rope_theta: RoPE base of the sliding layers, without `rope_scaling` (Gemma 3: 10000
        against 1e6 on global layers); None: every layer uses `rope_theta` and `rope_scaling`.
      query_pre_attn_scalar: attention logits are scaled by query_pre_attn_scalar ** -0.5
        (Gemma); None: head_dim ** -0.5.
      attn_logit_softcap: attention logits become cap * tanh(logits / cap) (Gemma 2); None: off.
      final_logit_softcap: the same on the output logits; None: off.
      dtype: parameter and activation dtype ("float32" on CPU, "bfloat16" on TPU/GPU).
      scan_layers: scan over the stacked layers (compile time independent of depth) instead of
        unrolling them (faster steps on GPU/TPU: no per-layer weight slice copies).
      quantization: which weights are stored quantized and how (`jaxinfer.quantization`); None:
        every weight in `dtype`.
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
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    dtype: str = "float32"
    scan_layers: bool = True
    quantization: QuantSpec | None = None

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
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types needs num_layers = {self.num_layers} entries from {LAYER_TYPES}, "
                                 f"got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")

    # ---- what follows from the architecture ----------------------------------------------------

    @property
    def is_gemma(self) -> bool:
        """Gemma numerics: (1 + w) norms, qk-norm, post-norms, GELU-tanh MLP, scaled embedding."""
        return self.arch == "gemma3"

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by (norm_offset + weight): 1 for Gemma (weights stored as offsets), else 0."""
        return 1.0 if self.is_gemma else 0.0

    @property
    def hidden_act(self) -> str:
        """The gated MLP's activation: "gelu_tanh" (GeGLU, Gemma) or "silu" (SwiGLU)."""
        return "gelu_tanh" if self.is_gemma else "silu"

    @property
    def attn_scale(self) -> float:
        """The attention logit scale."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: full attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    def layer_is_local(self) -> tuple[bool, ...]:
        """Per layer, whether it takes the local RoPE (`local_rope_theta`, no scaling)."""
        if self.local_rope_theta is None or self.layer_types is None:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

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
        if self.is_gemma:  # q/k norms, post-attention and post-MLP norms
            per_layer += 2 * h + 2 * d
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
