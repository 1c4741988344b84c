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
from jaxinfer.model import Transformer
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
               progress: bool = True, mesh=None) -> LoadedModel:
    """Loads a registered model name, a .gguf path, or a jaxinfer orbax checkpoint directory.

    Args:
      model: registry name (e.g. "smollm2-135m"), a .gguf file, a HF directory (config.json +
        safetensors + tokenizer files) or a jaxinfer orbax checkpoint directory.
      dtype: parameter dtype; None picks float32 on CPU, bfloat16 on GPU/TPU.
      scan_layers: scan over layers; None picks scan on CPU, unrolled on GPU/TPU.
      progress: show a progress bar while reading tensors.
      mesh: restore an orbax checkpoint, or stream a HF checkpoint, straight into this mesh's
        shardings (GGUF files are dequantized on the host and placed by the engine).

    Raises:
      ModelNotFoundError, CheckpointError, UnsupportedModelError, TokenizerError.
    """
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
            weights = ckpt.load_params(cfg, progress=progress, to_device=True, shardings=shardings)
            graphdef, params = build_model(cfg, weights)
            logger.info("loaded HF checkpoint %s (%s): %.1fM parameters, %s", path, ckpt.architecture,
                        cfg.num_params() / 1e6, cfg.dtype)
            return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, path=path,
                               source=f"HF checkpoint ({ckpt.architecture})")
    if os.path.isdir(path):  # an orbax checkpoint directory
        from checkpoints import orbax_io

        cfg, weights = orbax_io.restore(path, dtype=dtype, scan_layers=scan_layers, mesh=mesh)
        tok = orbax_io.read_tokenizer(path)
        graphdef, params = build_model(cfg, weights)
        logger.info("loaded orbax checkpoint %s: %.1fM parameters, %s", path, cfg.num_params() / 1e6, cfg.dtype)
        return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, path=path,
                           source=f"orbax checkpoint ({cfg.arch})")
    gguf_file = GGUFFile(path)
    cfg = gguf_file.model_config(dtype=dtype, scan_layers=scan_layers)
    tok = tokenizer_lib.from_gguf_metadata(gguf_file.metadata, source=path)
    weights = gguf_file.load_params(cfg, progress=progress)
    graphdef, params = build_model(cfg, weights)
    logger.info("loaded %s: %.1fM parameters, %s, scan_layers=%s", path, cfg.num_params() / 1e6,
                cfg.dtype, cfg.scan_layers)
    return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, path=path,
                       source=f"GGUF file ({gguf_file.architecture})")
