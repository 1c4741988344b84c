"""Attention heads laid out so that tensor parallelism can split them evenly.

Each of the M `model` shards must own whole GQA groups: some KV heads and the query heads that
read them. Head counts rarely cooperate (SmolLM2: 9 query / 3 KV heads; M = 2, 4, 8), so the
weights are re-laid out once at load time, the model code never knowing:

    K % M == 0    nothing to do
    M % K == 0    each KV head is replicated r = M / K times and its G query heads are dealt
                  over the replicas (ceil(G / r) per replica)
    otherwise     K is first padded with dummy KV heads to the next count that fits either rule

    SmolLM2, M = 4: K 3 -> 4 (one dummy), G 3, N 9 -> 12:
      shard 0: kv 0, q 0 1 2 | shard 1: kv 1, q 3 4 5 | shard 2: kv 2, q 6 7 8 | shard 3: dummy
    SmolLM2, M = 8: K 3 -> 4 -> 8 (each replicated twice), G 3 -> 2 per replica, N -> 16:
      shard 0: kv 0, q 0 1 | shard 1: kv 0, q 2 + dummy | shard 2: kv 1, q 3 4 | ...

Dummy query heads have zero weights in wq and zero rows in wo, so they add exactly nothing; dummy
KV heads have zero wk/wv. The maths is the single-device model's; the cost is the padding's FLOPs
and, with replication, KV cache memory per shard (each shard holds its own copy).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    num_heads: int  # N' (a multiple of the model axis size)
    num_kv_heads: int  # K'
    q_source: tuple[int, ...]  # [N'] the original query head at each slot, -1 for a dummy
    kv_source: tuple[int, ...]  # [K'] the original KV head at each slot, -1 for a dummy

    @property
    def is_identity(self) -> bool:
        return self.q_source == tuple(range(len(self.q_source))) and \
            self.kv_source == tuple(range(len(self.kv_source)))


def head_layout(num_heads: int, num_kv_heads: int, model_size: int) -> HeadLayout:
    """The padded / replicated head layout for `model_size` tensor-parallel shards."""
    N, K, M = num_heads, num_kv_heads, model_size
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} KV heads")
    G = N // K
    Kp = K
    while Kp % M and M % Kp:
        Kp += 1
    r = 1 if Kp % M == 0 else M // Kp  # replicas per KV head
    Gr = math.ceil(G / r)  # query heads per replica
    kv_source, q_source = [], []
    for j in range(Kp * r):
        kv, replica = divmod(j, r)
        kv_source.append(kv if kv < K else -1)
        for i in range(Gr):
            g = replica * Gr + i
            q_source.append(kv * G + g if kv < K and g < G else -1)
    return HeadLayout(num_heads=len(q_source), num_kv_heads=len(kv_source), q_source=tuple(q_source),
                      kv_source=tuple(kv_source))


def _take_heads(x, source, axis: int):
    """x's slices along `axis` in the order `source`, zeros where source is -1."""
    src = np.asarray(source)
    out = jnp.take(x, np.maximum(src, 0), axis=axis)
    keep = (src >= 0).reshape([-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])
    return jnp.where(keep, out, 0).astype(x.dtype)


# parameter name -> (head axis, which heads) in the stacked [L, ...] layout
_HEAD_AXES = {"wq": (2, "q"), "wk": (2, "kv"), "wv": (2, "kv"), "wo": (1, "q"),
              "bq": (1, "q"), "bk": (1, "kv"), "bv": (1, "kv")}


def relayout_weights(cfg: ModelConfig, weights: dict, model_size: int) -> tuple[ModelConfig, dict]:
    """(config, {"layers.wq": [L, D, N, H], ...}) -> the same for the layout of `model_size` shards."""
    layout = head_layout(cfg.num_heads, cfg.num_kv_heads, model_size)
    if layout.is_identity:
        return cfg, weights
    out = dict(weights)
    for key, value in weights.items():
        # a quantized weight's scales and offsets keep its head axis (only the grouped axis shrinks)
        name = key.rsplit(".", 1)[-1].removesuffix("_scale").removesuffix("_offset")
        if key.startswith("layers.") and name in _HEAD_AXES:
            axis, which = _HEAD_AXES[name]
            out[key] = _take_heads(jnp.asarray(value), layout.q_source if which == "q" else layout.kv_source, axis)
    return dataclasses.replace(cfg, num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads), out


def relayout_model(cfg: ModelConfig, params, model_size: int):
    """(config, NNX params) -> (config, graphdef, params) with heads laid out for `model_size`
    shards (unchanged arrays where the layout is already even). Per-layer params (an engine's
    unrolled layers) are restacked first: the re-layout works on stacked weights."""
    from flax import nnx

    from jaxinfer.loader import build_model
    from jaxinfer.model import restack_layers

    params = restack_layers(params)
    weights = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(params)}
    new_cfg, new_weights = relayout_weights(cfg, weights, model_size)
    return (new_cfg, *build_model(new_cfg, new_weights))
