"""jaxinfer checkpoints as orbax directories: save once, restore straight into any mesh.

    out_dir/
      jaxinfer.json     format version, the ModelConfig, where it came from
      tokenizer.json    the tokenizer's GGUF metadata (vocabulary, merges, special ids, template), or
      hf_tokenizer/     the HF tokenizer files, for checkpoints converted from a HF directory
      params/           orbax checkpoint of {"embed": [V, D], "layers.wq": [L, D, N, H], ...}

Parameters are stored in the model's own (stacked, unsharded) layout, so a checkpoint does not
depend on the mesh it was saved from. Restoring with a mesh reads each array straight into the
sharding the rules give it there (orbax reads only the slices a host's devices hold), never
materialising a full copy on one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.quantization import QuantSpec
from jaxinfer.errors import CheckpointError

FORMAT = "jaxinfer-orbax"
VERSION = 1
CONFIG_FILE = "jaxinfer.json"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


HF_TOKENIZER_DIR = "hf_tokenizer"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja")


def save(path: str | os.PathLike, cfg: ModelConfig, weights: dict, tokenizer_metadata: dict | None = None, *,
         source: str = "", hf_tokenizer_dir: str | None = None) -> str:
    """Writes a checkpoint directory (which must not exist yet) and returns its path.

    Args:
      cfg: the model's config.
      weights: arrays keyed like the model state ("embed", "layers.wq", ...), stacked layout.
      tokenizer_metadata: the GGUF "tokenizer.*" metadata the tokenizer is rebuilt from, or
      hf_tokenizer_dir: a HF directory whose tokenizer files are copied in.
      source: where the weights came from (recorded, informational).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.listdir(path):
        raise CheckpointError(f"{path} exists and is not empty: choose a new output directory")
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), {k: np.asarray(v) if not isinstance(v, jax.Array) else v
                                                  for k, v in weights.items()})
        ckpt.wait_until_finished()
    if hf_tokenizer_dir is not None:
        import shutil

        os.makedirs(os.path.join(path, HF_TOKENIZER_DIR))
        for name in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(hf_tokenizer_dir, name)):
                shutil.copyfile(os.path.join(hf_tokenizer_dir, name), os.path.join(path, HF_TOKENIZER_DIR, name))
    else:
        meta = {k: _jsonable(v) for k, v in (tokenizer_metadata or {}).items() if k.startswith("tokenizer.")}
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(meta, f)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "source": source, "config": dataclasses.asdict(cfg)}, f,
                  indent=1)
    return path


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = os.fspath(path)
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {CONFIG_FILE} ({e})") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} checkpoint (found {info.get('format')!r} "
                              f"v{info.get('version')!r}); convert the model again with `jaxinfer convert`")
    raw = dict(info["config"])
    if raw.get("rope_scaling"):
        raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
    if raw.get("rope_freq_factors") is not None:
        raw["rope_freq_factors"] = tuple(raw["rope_freq_factors"])
    if raw.get("layer_types") is not None:
        raw["layer_types"] = tuple(raw["layer_types"])
    try:
        if raw.get("quantization") is not None:
            raw["quantization"] = QuantSpec.from_dict(raw["quantization"])
        return ModelConfig(**raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: invalid model config in {CONFIG_FILE} ({e})") from None


def read_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (from its GGUF metadata or its copied HF tokenizer files)."""
    from jaxinfer import tokenizer as tokenizer_lib

    path = os.fspath(path)
    hf_dir = os.path.join(path, HF_TOKENIZER_DIR)
    if os.path.isdir(hf_dir):
        return tokenizer_lib.from_hf_directory(hf_dir)
    return tokenizer_lib.from_gguf_metadata(read_tokenizer_metadata(path), source=path)


def read_tokenizer_metadata(path: str | os.PathLike) -> dict:
    with open(os.path.join(os.fspath(path), "tokenizer.json")) as f:
        return json.load(f)


def restore(path: str | os.PathLike, *, dtype: str | None = None, scan_layers: bool | None = None, mesh=None):
    """Reads a checkpoint. Returns (config, weights dict of jax arrays).

    With `mesh`, every array is read into the sharding `sharding.rules` gives it on that mesh
    (any mesh: the stored layout is unsharded); otherwise onto the default device.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxinfer.model import Transformer

    path = os.path.abspath(os.fspath(path))
    cfg = read_config(path)
    overrides = {k: v for k, v in (("dtype", dtype), ("scan_layers", scan_layers)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    if mesh is not None:
        from sharding.rules import logical_to_spec

        def target(var):
            value = var.get_value()
            spec = logical_to_spec(var.get_metadata()["logical_axes"], value.shape, mesh)
            return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def target(var):
            value = var.get_value()
            return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=device)

    abstract_weights = {k: target(v) for k, v in flat.items()}
    try:
        with ocp.StandardCheckpointer() as ckpt:
            weights = ckpt.restore(os.path.join(path, "params"), abstract_weights)
    except Exception as e:  # orbax raises many types for missing / mismatched arrays
        raise CheckpointError(f"{path}: cannot restore the parameters ({type(e).__name__}: {e})") from None
    return cfg, weights
