"""HF checkpoints: `config.json` + `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`) + the tokenizer files, for Llama 2/3/3.1, Mistral, Qwen2 and Gemma 3
(text-only `Gemma3ForCausalLM`, and the language model of a `Gemma3ForConditionalGeneration`).

Each tensor is read on its own from its safetensors file (the format is an 8-byte header length,
a JSON header of {name: dtype, shape, byte offsets}, then the raw little-endian data), so
converting one tensor touches only that tensor's bytes; bfloat16 is read through ml_dtypes. With
`to_device=True` each stacked [L, ...] parameter is allocated on the device and filled layer by
layer (a donated in-place update), so host memory holds about one source tensor at a time
instead of a second copy of the model (tests/test_hf.py measures it on a 2+ GB checkpoint).

HF stores Llama-family Q/K rows in the rotate-half layout jaxinfer uses, so no permutation is
needed (unlike GGUF); linear weights are [out, in] and are transposed to jaxinfer's [in, out].
Gemma's norm weights are stored as offsets from 1, the form jaxinfer keeps.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from checkpoints.stacking import device_zeros, set_block, stack_per_layer
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.errors import CheckpointError, UnsupportedModelError

# HF `architectures` entry -> jaxinfer arch.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3"}

# Gemma3TextConfig's defaults: saved configs (above all a multimodal checkpoint's `text_config`)
# leave out the fields that equal them.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}
# Where the decoder's tensors live: a causal LM, or the language model inside a multimodal Gemma 3
# (as transformers 5 saves it, and as the original checkpoints are laid out).
_PREFIXES = ("model.", "model.language_model.", "language_model.model.")

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
INDEX_FILE = "model.safetensors.index.json"


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory with a config.json and safetensors weights."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX_FILE))
        or any(f.endswith(".safetensors") for f in os.listdir(path)))


class _SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors come out as read-only numpy views."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= os.path.getsize(path) - 8:
                    raise ValueError(f"header length {n} does not fit the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self._data_start = 8 + n
        self._size = os.path.getsize(path)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only its rows [r0, r1) along the first axis."""
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UnsupportedModelError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which jaxinfer does "
                                        f"not load; use one of {sorted(_DTYPES)}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - start != nbytes or self._data_start + end > self._size:
            raise CheckpointError(f"{self.path}: tensor {name} does not have the {nbytes} bytes of the {shape} "
                                  f"{info['dtype']} its header says (truncated file?)")
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            start, shape = start + rows[0] * row_bytes, (rows[1] - rows[0], *shape[1:])
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:  # read(), not a memory map: no file pages stay mapped
            f.seek(self._data_start + start)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out


class HFCheckpoint:
    """A HF model directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
                self.config: dict[str, Any] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: config.json cannot be read ({e})") from None
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors weights in this directory")
        self._files = {f: _SafetensorsFile(os.path.join(self.path, f)) for f in files}
        self._where = {}
        for fname, sf in self._files.items():
            for name in sf.header:
                self._where[name] = sf
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items() if n not in self._files[f].header)
            if missing:
                raise CheckpointError(f"{self.path}: the index lists tensors its shards lack: {missing[:5]}")

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        for a in archs:
            if a in ARCHITECTURES:
                return a
        raise UnsupportedModelError(f"{self.path}: architectures {archs} are not supported; jaxinfer loads HF "
                                    f"{sorted(ARCHITECTURES)} checkpoints")

    def model_config(self, *, dtype: str = "float32", scan_layers: bool = True) -> ModelConfig:
        c = self.config
        arch = ARCHITECTURES[self.architecture]
        extra: dict[str, Any] = {}
        if arch == "gemma3":
            c = GEMMA3_TEXT_DEFAULTS | dict(c.get("text_config") or c)
            extra = self._gemma3_fields(c)
        n = int(c["num_attention_heads"])
        d = int(c["hidden_size"])
        rope = c.get("rope_parameters") or {}  # newer configs keep rope_theta and the scaling here
        if arch == "gemma3" and "full_attention" in rope:
            rope = rope["full_attention"] or {}
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        window = c.get("sliding_window") if arch in ("mistral", "gemma3") or c.get("use_sliding_window") else None
        try:
            return ModelConfig(
                arch=arch, vocab_size=int(c["vocab_size"]), hidden_size=d,
                intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                num_heads=n, num_kv_heads=int(c.get("num_key_value_heads") or n),
                head_dim=int(c.get("head_dim") or d // n), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                rope_scaling=self._rope_scaling(scaling),
                max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
                sliding_window=int(window) if window else None, dtype=dtype, scan_layers=scan_layers, **extra)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: config.json is incomplete or inconsistent: {e!r}") from None

    def _rope_scaling(self, scaling: dict | None) -> RopeScaling | None:
        if not scaling:
            return None
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
        if kind != "llama3":
            raise UnsupportedModelError(f"{self.path}: rope scaling {kind!r} is not supported (llama3 and linear are)")
        return RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))

    def _gemma3_fields(self, c: dict) -> dict[str, Any]:
        """Gemma 3's local/global layers, local RoPE base, attention scale and final soft cap.

        transformers' Gemma 3 attention does not apply `attn_logit_softcapping` (every released
        config sets it to null), so neither does jaxinfer; `final_logit_softcapping` is applied."""
        layers = int(c["num_hidden_layers"])
        types = c.get("layer_types")
        if types is None:
            pattern = int(c.get("sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        local = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{self.path}: scaled RoPE on Gemma 3's local layers is not supported")
        cap = c.get("final_logit_softcapping")
        return dict(layer_types=tuple(types),
                    local_rope_theta=float(local.get("rope_theta", c.get("rope_local_base_freq", 10_000.0))),
                    query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
                    final_logit_softcap=float(cap) if cap else None)

    def _tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self._tensor_info(name, shape)
        return self._where[name].get(name)

    def _matrix(self, name: str, shape: tuple[int, ...], dtype, to_device: bool, transpose: bool = False,
                sharding=None):
        """A whole (possibly transposed) tensor; on the device (laid out by `sharding`, if given) it
        is written in blocks of rows read straight from the file, so the host never holds more
        than one block of it."""
        if not to_device:
            w = self._tensor(name, shape)
            w = w.T if transpose else w
            return w.astype(dtype, copy=transpose or w.dtype != dtype)
        self._tensor_info(name, shape)
        out = device_zeros(shape[::-1] if transpose else shape, dtype, sharding)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4
        step = max(1, (32 << 20) // max(row_bytes, 1))  # about 32 MB of float32 per block
        for r0 in range(0, shape[0], step):
            block = self._where[name].get(name, rows=(r0, min(shape[0], r0 + step)))
            at = (0, r0) if transpose else (r0,) + (0,) * (len(shape) - 1)
            out = set_block(out, block.T if transpose else block, at)
            del block
        return out

    def _tensor_info(self, name: str, shape: tuple[int, ...]) -> None:
        sf = self._where.get(name)
        if sf is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        if tuple(sf.header[name]["shape"]) != shape:
            raise CheckpointError(f"{self.path}: tensor {name} has shape {tuple(sf.header[name]['shape'])}, "
                                  f"expected {shape}")

    def _prefix(self) -> str:
        for prefix in _PREFIXES:
            if f"{prefix}embed_tokens.weight" in self._where:
                return prefix
        raise CheckpointError(f"{self.path}: no embedding tensor (looked for "
                              f"{[p + 'embed_tokens.weight' for p in _PREFIXES]})")

    def load_params(self, cfg: ModelConfig, *, progress: bool = True, to_device: bool = False,
                    shardings: dict | None = None) -> dict:
        """All weights in jaxinfer's layout, keyed like the model state (as GGUFFile.load_params):
        numpy arrays, or with `to_device` jax arrays filled tensor by tensor, on the default device
        or, where `shardings` (key -> jax Sharding) names one, straight into that layout."""
        shardings = shardings or {}
        L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = _NUMPY_DTYPES[cfg.dtype]
        per_layer = {  # name -> (HF suffix, HF shape, convert to jaxinfer layout)
            "attn_norm": ("input_layernorm.weight", (D,), lambda w: w),
            "wq": ("self_attn.q_proj.weight", (N * H, D), lambda w: w.T.reshape(D, N, H)),
            "wk": ("self_attn.k_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H)),
            "wv": ("self_attn.v_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H)),
            "wo": ("self_attn.o_proj.weight", (D, N * H), lambda w: w.T.reshape(N, H, D)),
            # Gemma's post_attention_layernorm normalises the attention output; its pre-MLP norm is
            # pre_feedforward_layernorm.
            "mlp_norm": ("pre_feedforward_layernorm.weight" if cfg.is_gemma else "post_attention_layernorm.weight",
                         (D,), lambda w: w),
            "w_gate": ("mlp.gate_proj.weight", (F, D), lambda w: w.T),
            "w_up": ("mlp.up_proj.weight", (F, D), lambda w: w.T),
            "w_down": ("mlp.down_proj.weight", (D, F), lambda w: w.T),
        }
        if cfg.is_gemma:
            per_layer |= {
                "q_norm": ("self_attn.q_norm.weight", (H,), lambda w: w),
                "k_norm": ("self_attn.k_norm.weight", (H,), lambda w: w),
                "post_attn_norm": ("post_attention_layernorm.weight", (D,), lambda w: w),
                "post_mlp_norm": ("post_feedforward_layernorm.weight", (D,), lambda w: w),
            }
        if cfg.attention_bias:
            per_layer |= {
                "bq": ("self_attn.q_proj.bias", (N * H,), lambda w: w.reshape(N, H)),
                "bk": ("self_attn.k_proj.bias", (K * H,), lambda w: w.reshape(K, H)),
                "bv": ("self_attn.v_proj.bias", (K * H,), lambda w: w.reshape(K, H)),
            }
        tied = cfg.tie_word_embeddings
        if not tied and "lm_head.weight" not in self._where:
            raise CheckpointError(f"{self.path}: config.json says the output projection is not tied, but there is no "
                                  "lm_head.weight")
        params: dict[str, np.ndarray] = {}
        total = 2 + (0 if tied else 1) + L * len(per_layer)
        bar = tqdm(total=total, desc=f"Loading {os.path.basename(self.path)}", unit="tensor", disable=not progress,
                   leave=False)
        with bar:
            prefix = self._prefix()
            params["embed"] = self._matrix(f"{prefix}embed_tokens.weight", (V, D), dt, to_device,
                                           sharding=shardings.get("embed"))
            bar.update()
            params |= stack_per_layer(
                per_layer, lambda i, suffix, shape: self._tensor(f"{prefix}layers.{i}.{suffix}", shape), L, dt,
                progress=bar, to_device=to_device, shardings=shardings)
            params["final_norm"] = self._matrix(f"{prefix}norm.weight", (D,), dt, to_device,
                                                sharding=shardings.get("final_norm"))
            bar.update()
            if not tied:
                params["lm_head"] = self._matrix("lm_head.weight", (V, D), dt, to_device, transpose=True,
                                                 sharding=shardings.get("lm_head"))
                bar.update()
        return params
