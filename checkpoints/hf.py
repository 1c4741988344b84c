"""HF checkpoints: `config.json` + `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`) + the tokenizer files, for Llama 2/3/3.1, Mistral and Qwen2.

Tensors are read through a memory map of each safetensors file (its format is an 8-byte header
length, a JSON header of {name: dtype, shape, byte offsets}, then the raw little-endian data), so
converting one tensor touches only that tensor's bytes: host memory holds the stacked [L, ...]
result plus about one source tensor. bfloat16 is read through ml_dtypes.

HF stores Llama-family Q/K rows in the rotate-half layout jaxinfer uses, so no permutation is
needed (unlike GGUF); linear weights are [out, in] and are transposed to jaxinfer's [in, out].
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.errors import CheckpointError, UnsupportedModelError

# HF `architectures` entry -> jaxinfer arch.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

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
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UnsupportedModelError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which jaxinfer does "
                                        f"not load; use one of {sorted(_DTYPES)}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        raw = self._map[self._data_start + start:self._data_start + end]
        if raw.size != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{self.path}: tensor {name} has {raw.size} bytes, not the {shape} {info['dtype']} "
                                  "its header says (truncated file?)")
        return raw.view(dtype).reshape(shape)


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
        n = int(c["num_attention_heads"])
        d = int(c["hidden_size"])
        rope = c.get("rope_parameters") or {}  # newer configs keep rope_theta and the scaling here
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise UnsupportedModelError(f"{self.path}: rope scaling {kind!r} is not supported (llama3 is)")
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
        window = c.get("sliding_window") if arch == "mistral" or c.get("use_sliding_window") else None
        try:
            return ModelConfig(
                arch=arch, vocab_size=int(c["vocab_size"]), hidden_size=d,
                intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                num_heads=n, num_kv_heads=int(c.get("num_key_value_heads") or n),
                head_dim=int(c.get("head_dim") or d // n), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
                max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
                sliding_window=int(window) if window else None, dtype=dtype, scan_layers=scan_layers)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: config.json is incomplete or inconsistent: {e!r}") from None

    def _tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        sf = self._where.get(name)
        if sf is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        w = sf.get(name)
        if w.shape != shape:
            raise CheckpointError(f"{self.path}: tensor {name} has shape {w.shape}, expected {shape}")
        return w

    def load_params(self, cfg: ModelConfig, *, progress: bool = True) -> dict[str, np.ndarray]:
        """All weights in jaxinfer's layout, keyed like the model state (as GGUFFile.load_params)."""
        L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = _NUMPY_DTYPES[cfg.dtype]
        per_layer = {  # name -> (HF suffix, HF shape, convert to jaxinfer layout)
            "attn_norm": ("input_layernorm.weight", (D,), lambda w: w),
            "wq": ("self_attn.q_proj.weight", (N * H, D), lambda w: w.T.reshape(D, N, H)),
            "wk": ("self_attn.k_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H)),
            "wv": ("self_attn.v_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H)),
            "wo": ("self_attn.o_proj.weight", (D, N * H), lambda w: w.T.reshape(N, H, D)),
            "mlp_norm": ("post_attention_layernorm.weight", (D,), lambda w: w),
            "w_gate": ("mlp.gate_proj.weight", (F, D), lambda w: w.T),
            "w_up": ("mlp.up_proj.weight", (F, D), lambda w: w.T),
            "w_down": ("mlp.down_proj.weight", (D, F), lambda w: w.T),
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
            params["embed"] = self._tensor("model.embed_tokens.weight", (V, D)).astype(dt)
            bar.update()
            for name, (suffix, shape, convert) in per_layer.items():
                stacked = np.empty((L, *convert(np.empty(shape, np.float32)).shape), dtype=dt)
                for i in range(L):  # one source tensor at a time, written into the stacked array
                    stacked[i] = convert(self._tensor(f"model.layers.{i}.{suffix}", shape))
                    bar.update()
                params[f"layers.{name}"] = stacked
            params["final_norm"] = self._tensor("model.norm.weight", (D,)).astype(dt)
            bar.update()
            if not tied:
                params["lm_head"] = self._tensor("lm_head.weight", (V, D)).T.astype(dt)
                bar.update()
        return params
