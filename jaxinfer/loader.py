"""Model loading: resolve a name, read the GGUF, build the NNX model with its weights on device.

    "smollm2-135m" -> registry -> GGUFFile -> (ModelConfig, numpy weights, tokenizer metadata)
                   -> abstract Transformer (no random init) -> params placed on the device
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.gguf import GGUFFile
from jaxinfer import tokenizer as tokenizer_lib
from jaxinfer.config import ModelConfig, default_dtype, default_scan_layers
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.model import Transformer
from jaxinfer.quantization import check_method, quantize_params
from jaxinfer.registry import resolve_model_path

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: config, NNX graph definition, parameters and tokenizer."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State | None  # None once a runner took them over (it may re-layout them)
    tokenizer: tokenizer_lib.Tokenizer
    path: str
    source: str = ""  # what was found at `path`: "GGUF file (gemma3)", "HF checkpoint (...)", "orbax checkpoint"


def build_model(cfg: ModelConfig, weights: dict) -> tuple[nnx.GraphDef, nnx.State]:
    """NNX (graphdef, params) of a Transformer whose parameters are `weights` (keyed by path).

    Raises:
      ValueError: a weight is missing, unexpected, or of the wrong shape.
    """
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    expected = {".".join(map(str, path)): path for path in flat}
    if missing := sorted(set(expected) - set(weights)):
        raise ValueError(f"weights are missing {missing}")
    if extra := sorted(set(weights) - set(expected)):
        raise ValueError(f"unexpected weights {extra}")
    for key, path in expected.items():
        var, value = flat[path], weights[key]
        spec = var.get_value()  # a ShapeDtypeStruct: the model was built abstractly
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"weight {key} has shape {value.shape}, the model expects {spec.shape}")
        var.set_value(jnp.asarray(value, dtype=spec.dtype))
    return graphdef, nnx.from_flat_state(flat)


def target_shardings(cfg: ModelConfig, mesh) -> dict:
    """Parameter key -> NamedSharding the sharding rules give it on `mesh` (what the engine's
    `shard_params` would place), for loaders that write each tensor straight into its layout."""
    from jax.sharding import NamedSharding

    from sharding.rules import logical_to_spec

    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return {".".join(map(str, path)): NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"],
                                                                          var.get_value().shape, mesh))
            for path, var in nnx.to_flat_state(state)}


def load_model(model: str | os.PathLike, *, dtype: str | None = None, scan_layers: bool | None = None,
               progress: bool = True, mesh=None, quantization: str | None = None) -> LoadedModel:
    """Loads a registered model name, a .gguf path, or a jaxinfer orbax checkpoint directory.

    Args:
      model: registry name (e.g. "smollm2-135m"), a .gguf file, a HF directory (config.json +
        safetensors + tokenizer files) or a jaxinfer orbax checkpoint directory.
      dtype: parameter dtype; None picks float32 on CPU, bfloat16 on GPU/TPU.
      scan_layers: scan over layers; None picks scan on CPU, unrolled on GPU/TPU.
      progress: show a progress bar while reading tensors.
      mesh: restore an orbax checkpoint, or stream a HF checkpoint, straight into this mesh's
        shardings (GGUF files are dequantized on the host and placed by the engine).
      quantization: "int8" or "int4" keeps the projections, embedding and lm_head quantized in
        memory (`jaxinfer.quantization`): a GGUF's own blocks, a float checkpoint's weights
        quantized at load (the embedding and lm_head to 8 bits under int4), a quantized orbax
        checkpoint as stored; None: float weights (a quantized orbax checkpoint then keeps its own
        quantization).

    Raises:
      ModelNotFoundError, CheckpointError, UnsupportedModelError, TokenizerError, ValueError (an
      unknown `quantization`).
    """
    check_method(quantization)
    path = resolve_model_path(model)
    backend = jax.default_backend()
    dtype = dtype or default_dtype(backend)
    scan_layers = default_scan_layers(backend) if scan_layers is None else scan_layers
    if os.path.isdir(path):
        from checkpoints import hf

        if hf.is_hf_directory(path):  # config.json + safetensors + tokenizer files
            ckpt = hf.HFCheckpoint(path)
            cfg = ckpt.model_config(dtype=dtype, scan_layers=scan_layers)
            tok = tokenizer_lib.from_hf_directory(path)
            shardings = target_shardings(cfg, mesh) if mesh is not None and jax.process_count() == 1 else None
            weights = ckpt.load_params(cfg, progress=progress, to_device=not quantization, shardings=shardings)
            cfg, weights = _quantize_at_load(cfg, weights, quantization, progress, path)
            graphdef, params = build_model(cfg, weights)
            logger.info("loaded HF checkpoint %s (%s): %.1fM parameters, %s%s", path, ckpt.architecture,
                        cfg.num_params() / 1e6, cfg.dtype, _quant_note(cfg))
            return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, path=path,
                               source=f"HF checkpoint ({ckpt.architecture})")
    if os.path.isdir(path):  # an orbax checkpoint directory
        from checkpoints import orbax_io

        cfg, weights = orbax_io.restore(path, dtype=dtype, scan_layers=scan_layers, mesh=mesh)
        stored = cfg.quantization.method if cfg.quantization is not None else None
        if quantization and stored and quantization != stored:
            raise UnsupportedModelError(f"{path} is stored quantized to {stored}; load it with quantization="
                                        f"{stored!r} (or None), or convert the float model again to {quantization}")
        if quantization and not stored:
            cfg, weights = _quantize_at_load(cfg, weights, quantization, progress, path)
        tok = orbax_io.read_tokenizer(path)
        graphdef, params = build_model(cfg, weights)
        logger.info("loaded orbax checkpoint %s: %.1fM parameters, %s%s", path, cfg.num_params() / 1e6, cfg.dtype,
                    _quant_note(cfg))
        return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, path=path,
                           source=f"orbax checkpoint ({cfg.arch})")
    gguf_file = GGUFFile(path)
    cfg = gguf_file.model_config(dtype=dtype, scan_layers=scan_layers)
    tok = tokenizer_lib.from_gguf_metadata(gguf_file.metadata, source=path)
    weights, spec = gguf_file.load_params(cfg, progress=progress, quantization=quantization)
    cfg = dataclasses.replace(cfg, quantization=spec)
    graphdef, params = build_model(cfg, weights)
    logger.info("loaded %s: %.1fM parameters, %s, scan_layers=%s%s", path, cfg.num_params() / 1e6,
                cfg.dtype, cfg.scan_layers, _quant_note(cfg))
    return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, path=path,
                       source=f"GGUF file ({gguf_file.architecture})")


def _quantize_at_load(cfg: ModelConfig, weights: dict, method: str | None, progress: bool, path: str):
    if not method:
        return cfg, weights
    try:
        spec, weights = quantize_params(cfg, weights, method, progress=progress)
    except ValueError as e:
        raise UnsupportedModelError(f"{path}: cannot quantize to {method}: {e}") from None
    return dataclasses.replace(cfg, quantization=spec), weights


def _quant_note(cfg: ModelConfig) -> str:
    return "" if cfg.quantization is None else f", weights {cfg.quantization.method}"


def params_bytes(params: nnx.State) -> int:
    """Bytes the parameters take in memory (quantized values, scales and offsets included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params) if hasattr(x, "dtype"))
