"""Tensor-parallel footprint and communication of an 8B-shaped model, without allocating it.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding_report.py

For meshes (1, 1, 1) and (1, 1, M): bytes of parameters and KV cache per device, from abstract
arrays and the sharding rules (`sharding/rules.py`); and the collectives of one decode step,
read from the compiled HLO of the engine's forward step (abstract inputs, compiled for the
virtual CPU devices), against the minimum for tensor parallelism: two all-reduces per layer
(after attention's wo and the MLP's w_down).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.model import Transformer  # noqa: E402
from jaxinfer.paged_attention import PagedAttentionMeta, PagedKVCache, paged_attend  # noqa: E402
from sharding.attention import shard_attend  # noqa: E402
from sharding.heads import head_layout  # noqa: E402
from sharding.mesh import ParallelConfig, make_mesh  # noqa: E402
from sharding.rules import kv_cache_sharding, param_shardings  # noqa: E402

LLAMA3_8B = dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                 dtype="bfloat16", scan_layers=True)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of the abstract arrays `tree` placed by `shardings`."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, shards))


def count_collectives(hlo: str) -> dict:
    """Collective ops in an HLO module text, split into those inside while-loop bodies (per layer
    under scan) and the rest (once per step)."""
    counts = collections.Counter()
    computation = None
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    for line in hlo.splitlines():
        if m := re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line):
            computation = m.group(1)
        for op in COLLECTIVES:
            if re.search(rf"= [^=]*\b{op}(-start)?\(", line):
                counts[(op, computation in bodies)] += 1
    return counts


def decode_step_hlo(cfg: ModelConfig, mesh, *, batch: int, pages: int, page_size: int) -> str:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    p_shard = param_shardings(params, mesh)
    params = jax.tree.map(lambda v: v.get_value(), params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    p_shard = jax.tree.map(lambda v: v.get_value(), p_shard, is_leaf=lambda x: isinstance(x, nnx.Variable))
    cache = jax.eval_shape(functools.partial(PagedKVCache.zeros, num_layers=cfg.num_layers, num_pages=pages,
                                             page_size=page_size, num_kv_heads=cfg.num_kv_heads,
                                             head_dim=cfg.head_dim, dtype=jnp.dtype(cfg.dtype)))
    S, W = batch, 128
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    meta = PagedAttentionMeta(slot_mapping=i32(S), kv_lens=i32(S), page_table=i32(S, W), cu_q_lens=i32(S + 1),
                              num_seqs=i32())
    graphdef_params = nnx.split(abstract)[1]

    def step(params, kv_cache, tokens, positions, meta):
        state = jax.tree.map(lambda var, value: var.replace(value), graphdef_params, params,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
        model = nnx.merge(graphdef, state)
        attend = shard_attend(functools.partial(paged_attend, q_block=1, backend="reference"), mesh)
        hidden, kv_cache = model.forward(tokens, positions, kv_cache, meta, attend)
        return model.compute_logits(hidden[0]), kv_cache

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(p_shard, kv_cache_sharding(cache, mesh), replicated, replicated,
                                         replicated), donate_argnums=(1,))
    lowered = jitted.lower(params, cache, i32(1, S), i32(1, S), meta)
    return lowered.compile().as_text()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="decode sequences per step")
    ap.add_argument("--kv-tokens", type=int, default=64 * 2048, help="KV cache capacity in tokens")
    ap.add_argument("--page", type=int, default=16)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(f"# Llama-3-8B shape, bf16; {datetime.date.today().isoformat()}; jax {jax.__version__}; "
          f"{len(jax.devices())} {jax.devices()[0].platform} devices")
    print("| mesh (data, seq, model) | heads q/kv | params / device | KV cache / device | collectives per decode "
          "step (in the layer loop x L + outside) |")
    print("|---|---|---|---|---|")
    for tp in (1, args.tp):
        layout = head_layout(LLAMA3_8B["num_heads"], LLAMA3_8B["num_kv_heads"], tp)
        cfg = ModelConfig(**{**LLAMA3_8B, "num_heads": layout.num_heads, "num_kv_heads": layout.num_kv_heads})
        mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp), jax.devices()[:tp])
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        _, params = nnx.split(abstract)
        shard = param_shardings(params, mesh)
        unwrap = functools.partial(jax.tree.map, lambda v: v.get_value(),
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
        param_bytes = per_device_bytes(unwrap(params), unwrap(shard))
        pages = args.kv_tokens // args.page
        cache = jax.eval_shape(functools.partial(PagedKVCache.zeros, num_layers=cfg.num_layers, num_pages=pages,
                                                 page_size=args.page, num_kv_heads=cfg.num_kv_heads,
                                                 head_dim=cfg.head_dim, dtype=jnp.bfloat16))
        kv_bytes = per_device_bytes(cache, kv_cache_sharding(cache, mesh))
        counts = count_collectives(decode_step_hlo(cfg, mesh, batch=args.batch, pages=pages, page_size=args.page))
        desc = ", ".join(f"{op}: {counts[(op, True)]} x {cfg.num_layers} + {counts[(op, False)]}"
                         for op in COLLECTIVES if counts[(op, True)] or counts[(op, False)]) or "none"
        print(f"| (1, 1, {tp}) | {cfg.num_heads}/{cfg.num_kv_heads} | {param_bytes / 2**30:.2f} GiB | "
              f"{kv_bytes / 2**30:.2f} GiB ({args.kv_tokens} tokens) | {desc} |", flush=True)


if __name__ == "__main__":
    main()
