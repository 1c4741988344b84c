"""Logical axis names -> mesh axes, for parameters and the KV cache.

The model names the axes of every parameter (`nnx.Param(..., logical_axes=(...))`); these rules
say which mesh axis each name is split over. Tensor parallelism over `model`:

    heads, kv_heads   wq / wk / wv column-parallel (per-head outputs), wo row-parallel
    mlp               w_gate / w_up column-parallel, w_down row-parallel
    vocab             embedding rows and lm_head columns (vocab-parallel)
    embed, head_dim, layers   replicated

so each decoder block needs one all-reduce after attention (wo) and one after the MLP (w_down),
which XLA inserts from these shardings. A dimension the mesh axis does not divide is replicated
(logged), never padded here; heads are made divisible beforehand (`sharding/heads.py`).
"""

from __future__ import annotations

import logging

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "head_dim": None,
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "pages": "data",  # the KV pool: each data-parallel replica owns its own pages
}

# The paged KV cache [L, P, page, K, H]: KV heads over `model`, pages over `data` (whole pages).
KV_CACHE_AXES = ("layers", "pages", "page_slot", "kv_heads", "head_dim")


def logical_to_spec(axes, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array of `shape` whose dimensions are named `axes`."""
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(name)
        if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
            logger.info("replicating axis %s (%d) over %s (%d devices): not divisible", name, dim, mesh_axis,
                        mesh.shape[mesh_axis])
            mesh_axis = None
        spec.append(mesh_axis)
    return P(*spec)


def param_shardings(params: nnx.State, mesh: Mesh):
    """NamedShardings matching `params` (stacked [L, ...] arrays, or per-layer tuples after
    `unstack_layers`, whose elements drop the leading `layers` axis)."""

    def one(var):
        axes = var.get_metadata().get("logical_axes")
        value = var.get_value()
        if axes is None:
            raise ValueError(f"parameter of shape {getattr(value, 'shape', None)} has no logical_axes")
        if isinstance(value, tuple):  # unstacked layers
            spec = logical_to_spec(axes[1:], value[0].shape, mesh)
            return var.replace(tuple(NamedSharding(mesh, spec) for _ in value))
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh)))

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def kv_cache_spec(shape, mesh: Mesh) -> P:
    """PartitionSpec of one [L, P, page, K, H] cache array."""
    return logical_to_spec(KV_CACHE_AXES, shape, mesh)


def shard_params(params: nnx.State, mesh: Mesh) -> nnx.State:
    """`params` placed on the mesh by the rules. With several processes each builds its devices'
    shards from its own (identical) host copy."""
    shardings = param_shardings(params, mesh)
    if jax.process_count() == 1:
        return jax.device_put(params, shardings)
    import numpy as np

    def place(value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, params, shardings)


def kv_cache_sharding(cache, mesh: Mesh):
    """NamedShardings for a PagedKVCache (or its eval_shape)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, kv_cache_spec(x.shape, mesh)), cache)
