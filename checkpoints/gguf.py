"""GGUF checkpoints: model config from metadata, dequantized weights in jaxinfer's layout.

`checkpoints.gguf_reader` parses the header (the gguf package's reader is ~25x slower on a
vocabulary's metadata); the `gguf` package (llama.cpp's own) dequantizes every tensor type it
implements (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants, the IQ types, ...). This module maps
llama.cpp names and layouts onto the stacked parameters of `jaxinfer.model.Transformer`:

    GGUF (torch layout [out, in])         jaxinfer
    token_embd.weight [V, D]           -> embed [V, D]
    blk.i.attn_q.weight [N*H, D]       -> layers.wq[i] [D, N, H]   (llama.cpp's row permutation undone)
    blk.i.attn_k.weight [K*H, D]       -> layers.wk[i] [D, K, H]   (likewise)
    blk.i.attn_v.weight [K*H, D]       -> layers.wv[i] [D, K, H]
    blk.i.attn_output.weight [D, N*H]  -> layers.wo[i] [N, H, D]
    blk.i.ffn_{gate,up}.weight [F, D]  -> layers.w_{gate,up}[i] [D, F]
    blk.i.ffn_down.weight [D, F]       -> layers.w_down[i] [F, D]
    blk.i.{attn,ffn}_norm.weight [D]   -> layers.{attn,mlp}_norm[i]
    output_norm.weight, output.weight  -> final_norm, lm_head [D, V] (absent: tied embeddings)
    Gemma 3 also: blk.i.attn_{q,k}_norm [H] -> layers.{q,k}_norm[i]; blk.i.post_attention_norm,
    blk.i.post_ffw_norm [D] -> layers.post_{attn,mlp}_norm[i].

llama.cpp's converter interleaves each Llama Q/K head's rows so that its GPT-J style rotary applies;
the model here uses the rotate-half (NeoX / HF) layout, so the rows are put back. Qwen2 files are
written in the NeoX layout already and are not touched.

llama.cpp's Gemma converter stores every norm weight as 1 + w (llama.cpp multiplies by the weight);
jaxinfer keeps Gemma's form, x * (1 + w), so 1 is subtracted here, as transformers' GGUF reader does.
The file does not record Gemma 3's layer pattern, local RoPE base or attention scale; they are
llama.cpp's fixed values for the arch (`GEMMA3_*` below).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from checkpoints.gguf_blocks import EXACT_TYPES, decode
from checkpoints.gguf_reader import GGUFHeader, TruncatedTensor
from checkpoints.stacking import stack_per_layer
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.quantization import (EMBEDDING_METHOD, GROUP_AXIS, QTensor, QuantSpec, WeightQuant, float_group,
                                   merge_layers, quantize, quantized_names, to_params)

logger = logging.getLogger(__name__)

# llama.cpp architecture name -> jaxinfer arch. Mistral files use "llama".
_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3"}
_PERMUTED_QK = {"llama", "mistral"}  # written with GPT-J style interleaved rotary rows

# Gemma 3 values the GGUF leaves out (llama.cpp hard-codes them for the arch): every 6th layer is
# global, local layers use RoPE base 10000, logits are scaled by head_dim ** -0.5 except for the 27B
# (62 layers) whose query_pre_attn_scalar is hidden_size / num_heads.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_27B_LAYERS = 62

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _import_gguf():
    import gguf  # imported lazily: only GGUF loading needs it

    return gguf


class GGUFFile:
    """An opened GGUF file: metadata, model config and weights.

    Raises:
      CheckpointError: the file is missing, truncated or not a GGUF file.
      UnsupportedModelError: the architecture or a tensor type is not supported.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such file; pass the path of a .gguf file")
        try:
            header = GGUFHeader(self.path)
        except TruncatedTensor as e:
            raise CheckpointError(f"{self.path}: truncated: {e}. Download or convert the file again.") from None
        except Exception as e:  # ValueError for a bad header; the gguf package's enum for an unknown type
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file: truncated or corrupt ({type(e).__name__}: {e}). "
                "Download or convert it again."
            ) from None
        self.tensors = header.tensors
        self.metadata = header.metadata

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def model_config(self, *, dtype: str = "float32", scan_layers: bool = True) -> ModelConfig:
        """The ModelConfig this file describes."""
        arch = self.architecture
        if arch not in _ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: architecture {arch!r} is not supported; jaxinfer loads "
                f"{sorted(_ARCHITECTURES)} GGUF files"
            )
        m = self.metadata

        def get(key, default=None):
            full = f"{arch}.{key}"
            if full not in m and default is None:
                raise CheckpointError(f"{self.path}: metadata key {full!r} is missing")
            return m.get(full, default)

        d = int(get("embedding_length"))
        n = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", d // n))
        vocab = m.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(m.get("tokenizer.ggml.tokens", ())) or self.tensors["token_embd.weight"].shape[1]
        freq_factors = None
        if "rope_freqs.weight" in self.tensors:
            freq_factors = tuple(float(x) for x in self._dequantize(self.tensors["rope_freqs.weight"]))
        window = m.get(f"{arch}.attention.sliding_window")
        gemma: dict[str, Any] = {}
        if arch == "gemma3":
            pattern = int(m.get(f"{arch}.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN))
            layers = int(get("block_count"))
            cap = m.get(f"{arch}.final_logit_softcapping")
            gemma = dict(
                layer_types=tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                  for i in range(layers)),
                local_rope_theta=float(m.get(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA)),
                query_pre_attn_scalar=float(d // n if layers == GEMMA3_27B_LAYERS else head_dim),
                final_logit_softcap=float(cap) if cap else None,
            )
        try:
            return ModelConfig(
                arch=_ARCHITECTURES[arch],
                vocab_size=int(vocab),
                hidden_size=d,
                intermediate_size=int(get("feed_forward_length")),
                num_layers=int(get("block_count")),
                num_heads=n,
                num_kv_heads=int(get("attention.head_count_kv", n)),
                head_dim=head_dim,
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_freq_factors=freq_factors,
                max_position_embeddings=int(get("context_length", 4096)),
                tie_word_embeddings="output.weight" not in self.tensors,
                attention_bias="blk.0.attn_q.bias" in self.tensors,
                sliding_window=int(window) if window else None,
                dtype=dtype,
                scan_layers=scan_layers,
                **gemma,
            )
        except ValueError as e:
            raise CheckpointError(f"{self.path}: inconsistent model metadata: {e}") from None

    # ---- weights --------------------------------------------------------------------------

    def _dequantize(self, tensor) -> np.ndarray:
        gguf = _import_gguf()
        qtype = tensor.tensor_type
        try:
            out = gguf.quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"{self.path}: tensor {tensor.name!r} has type {qtype.name}, which the installed gguf "
                f"package cannot dequantize; requantize the file (F16, Q8_0, Q4_K, ...)"
            ) from None
        return np.asarray(out, dtype=np.float32)

    def _tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Dequantized tensor in torch layout, checked against the expected shape."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        w = self._dequantize(self.tensors[name])
        if w.shape != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {w.shape}, expected {shape}")
        return w

    @staticmethod
    def _norm(cfg: ModelConfig):
        """A norm weight as the file holds it -> jaxinfer's (Gemma: the file holds offset + w)."""
        return (lambda w: w - cfg.norm_offset) if cfg.norm_offset else (lambda w: w)

    def _layer_table(self, cfg: ModelConfig) -> dict:
        """name -> (GGUF suffix, torch shape, convert to jaxinfer's layout) for one layer's tensors.
        The converters are shape-generic (-1 on the input axis), so they lay out a quantized
        weight's scales and offsets exactly as its values."""
        D, F = cfg.hidden_size, cfg.intermediate_size
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        unpermute = cfg.arch in _PERMUTED_QK and self.architecture in _PERMUTED_QK
        norm = self._norm(cfg)

        def qk(w, heads):  # [heads*H, ...] rows interleaved -> rotate-half layout
            if not unpermute:
                return w
            return w.reshape(heads, H // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

        per_layer = {  # name -> (gguf suffix, torch shape, convert to jaxinfer layout)
            "attn_norm": ("attn_norm.weight", (D,), norm),
            "wq": ("attn_q.weight", (N * H, D), lambda w: qk(w, N).T.reshape(-1, N, H)),
            "wk": ("attn_k.weight", (K * H, D), lambda w: qk(w, K).T.reshape(-1, K, H)),
            "wv": ("attn_v.weight", (K * H, D), lambda w: w.T.reshape(-1, K, H)),
            "wo": ("attn_output.weight", (D, N * H), lambda w: w.T.reshape(N, -1, w.shape[0])),
            "mlp_norm": ("ffn_norm.weight", (D,), norm),
            "w_gate": ("ffn_gate.weight", (F, D), lambda w: w.T),
            "w_up": ("ffn_up.weight", (F, D), lambda w: w.T),
            "w_down": ("ffn_down.weight", (D, F), lambda w: w.T),
        }
        if cfg.is_gemma:
            per_layer |= {
                "q_norm": ("attn_q_norm.weight", (H,), norm),
                "k_norm": ("attn_k_norm.weight", (H,), norm),
                "post_attn_norm": ("post_attention_norm.weight", (D,), norm),
                "post_mlp_norm": ("post_ffw_norm.weight", (D,), norm),
            }
        if cfg.attention_bias:
            per_layer |= {
                "bq": ("attn_q.bias", (N * H,), lambda w: qk(w, N).reshape(N, H)),
                "bk": ("attn_k.bias", (K * H,), lambda w: qk(w, K).reshape(K, H)),
                "bv": ("attn_v.bias", (K * H,), lambda w: w.reshape(K, H)),
            }
        return per_layer

    def load_params(self, cfg: ModelConfig, *, progress: bool = True,
                    quantization: str | None = None) -> tuple[dict[str, np.ndarray], QuantSpec | None]:
        """All weights in jaxinfer's layout, keyed like the model's state, and how the quantized ones
        are stored (None without `quantization`).

        Keys: "embed", "final_norm", "lm_head" (untied only) and "layers.<name>" with a leading
        L axis; float arrays have `cfg.dtype`. With `quantization` ("int8" / "int4") the
        projections, embedding and lm_head keep the file's own blocks (`_qtensor`); the config the
        model is built with is then `dataclasses.replace(cfg, quantization=spec)`.

        Raises:
          UnsupportedModelError: a tensor type with no exact quantized form (with `quantization`)
            or that the gguf package cannot dequantize.
        """
        L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        dt = _NUMPY_DTYPES[cfg.dtype]
        per_layer = self._layer_table(cfg)
        quantized = set(quantized_names(cfg)) if quantization else set()
        params: dict[str, np.ndarray] = {}
        weights: list[WeightQuant] = []
        total = 2 + (0 if cfg.tie_word_embeddings else 1) + L * len(per_layer)
        bar = tqdm(total=total, desc=f"Loading {os.path.basename(self.path)}" + (f" ({quantization})" if quantization
                                                                                   else ""),
                   unit="tensor", disable=not progress, leave=False)

        def add_quantized(name, tensors: list[QTensor], stacked: bool):
            # int8 asks for 8-bit containers; under int4, a 5-8-bit tensor keeps its own int8 values
            bits = 8 if quantization == "int8" or any(t.bits == 8 for t in tensors) else 4
            axis = GROUP_AXIS[name]
            merged = merge_layers(tensors, bits, axis)
            if not stacked:
                merged = merged.map(lambda a: a[0])
            wq, arrays = to_params(name, merged, axis + (1 if stacked else 0))
            weights.append(wq)
            params.update({(f"layers.{k}" if stacked else k): v for k, v in arrays.items()})

        embedding_method = EMBEDDING_METHOD.get(quantization)  # the embedding / lm_head stay 8-bit under int4
        with bar:
            if "embed" in quantized:
                add_quantized("embed", [self._qtensor("token_embd.weight", (V, D), embedding_method)], False)
            else:
                params["embed"] = self._tensor("token_embd.weight", (V, D)).astype(dt, copy=False)
            bar.update()
            floats = {k: v for k, v in per_layer.items() if k not in quantized}
            params |= stack_per_layer(floats, lambda i, suffix, shape: self._tensor(f"blk.{i}.{suffix}", shape),
                                      L, dt, progress=bar)
            for name in (k for k in per_layer if k in quantized):
                suffix, shape, convert = per_layer[name]
                tensors = []
                for i in range(L):
                    # a float wo's groups stay inside a head (per channel: one scale per head)
                    t = self._qtensor(f"blk.{i}.{suffix}", shape, quantization,
                                      group_axis=cfg.head_dim if name == "wo" else None)
                    if name == "wo" and cfg.head_dim % t.group:  # wo's groups run within a head
                        raise UnsupportedModelError(
                            f"{self.path}: blk.{i}.{suffix} has {t.group}-wide groups, wider than a head "
                            f"({cfg.head_dim}); load it with quantization=None")
                    tensors.append(t.map(convert))
                    bar.update()
                add_quantized(name, tensors, True)
            params["final_norm"] = self._norm(cfg)(self._tensor("output_norm.weight", (D,))).astype(dt, copy=False)
            bar.update()
            if not cfg.tie_word_embeddings:
                if "lm_head" in quantized:
                    add_quantized("lm_head", [self._qtensor("output.weight", (V, D), embedding_method).map(
                        lambda w: w.T)], False)
                else:
                    params["lm_head"] = self._tensor("output.weight", (V, D)).T.astype(dt, copy=False)
                bar.update()
        spec = QuantSpec(method=quantization, weights=tuple(weights)) if quantization else None
        return params, spec

    def _qtensor(self, name: str, shape: tuple[int, int], method: str, group_axis: int | None = None) -> QTensor:
        """A tensor in torch layout [out, in] as quantized groups along `in`: the file's own blocks
        where its type has an exact int4/int8 form (4-bit types stay int4 even under "int8"'s
        containers, 5-8-bit types stay int8 under "int4"); float tensors quantized round-to-nearest
        to `method` in groups of `quantization.float_group` for an input axis of `group_axis` (default:
        the whole input axis)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        tensor = self.tensors[name]
        type_name = tensor.tensor_type.name
        if type_name in EXACT_TYPES:
            stored = tuple(int(x) for x in reversed(tensor.shape))
            if stored != shape:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {stored}, expected {shape}")
            return decode(tensor.data, type_name, shape)
        if type_name in ("F32", "F16", "BF16"):
            bits = 8 if method == "int8" else 4
            try:
                group = float_group(method, group_axis or shape[1])
                return quantize(self._tensor(name, shape), bits=bits, group=group, axis=1)
            except ValueError as e:
                raise UnsupportedModelError(f"{self.path}: tensor {name!r}: {e}; or load with quantization=None") \
                    from None
        raise UnsupportedModelError(
            f"{self.path}: tensor {name!r} has type {type_name}, which has no exact {method} form (jaxinfer keeps "
            f"{', '.join(EXACT_TYPES)} blocks as they are); load it with quantization=None (dequantized to "
            f"{'float'}) or use a file quantized to one of those types"
        )
