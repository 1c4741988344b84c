"""Compile time of the decode and prefill steps vs depth: SmolLM2's shape at 30 layers and at 2.

    python benchmarks/bench_compile.py [--layers 2 30] [--reps 3]

With scan_layers=True one layer is traced and compiled whatever the depth, so the 30-layer model
should compile in about the time of the 2-layer one (target: ratio < 2). The unrolled variant
(scan_layers=False, the accelerator default) is shown for contrast. Random weights: compile time
does not depend on their values. Each figure is the median of fresh lower+compile runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfer.config import ModelConfig  # noqa: E402

SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def compile_seconds(cfg: ModelConfig, reps: int, batch: int = 8, prompt: int = 128, cache: int = 256):
    import jax
    from flax import nnx

    from jaxinfer.model import Transformer
    from jaxinfer.reference import ReferenceGenerator

    # Abstract parameters: lowering needs only shapes and dtypes.
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    gen = ReferenceGenerator(cfg, graphdef, params)
    cache_spec = jax.eval_shape(lambda: gen._empty_cache(batch, cache))
    sds = jax.ShapeDtypeStruct
    f32, i32, u32 = np.float32, np.int32, np.uint32
    vec = lambda dt: sds((batch,), dt)  # noqa: E731
    decode_args = (params, cache_spec, vec(i32), vec(i32), vec(i32), vec(f32), vec(i32), vec(f32), vec(u32))
    prefill_args = (params, cache_spec, sds((batch, prompt), i32), vec(i32), vec(f32), vec(i32), vec(f32), vec(u32))
    out = {}
    for name, fn, args in (("decode", gen._decode_step, decode_args), ("prefill", gen._prefill_step, prefill_args)):
        times = []
        for _ in range(reps):
            # A fresh function object each time: jit's trace and compile caches cannot hit.
            jitted = jax.jit(lambda *a, fn=fn: fn(*a), donate_argnums=(1,))
            t0 = time.perf_counter()
            jitted.lower(*args).compile()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 30])
    ap.add_argument("--reps", type=int, default=3)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; SmolLM2-135M shape, batch 8, "
          f"prompt 128, cache 256; median of {args.reps} lower+compile runs\n")
    print("| scan_layers | layers | decode step compile s | prefill step compile s |")
    print("|---|---|---|---|")
    results = {}
    for scan in (True, False):
        for n in args.layers:
            cfg = dataclasses.replace(SMOLLM2, num_layers=n, scan_layers=scan)
            results[scan, n] = compile_seconds(cfg, args.reps)
            r = results[scan, n]
            print(f"| {scan} | {n} | {r['decode']:.2f} | {r['prefill']:.2f} |", flush=True)
    lo, hi = min(args.layers), max(args.layers)
    for scan in (True, False):
        ratios = {k: results[scan, hi][k] / results[scan, lo][k] for k in ("decode", "prefill")}
        print(f"\nscan_layers={scan}: {hi} layers / {lo} layers compile-time ratio: "
              f"decode {ratios['decode']:.2f}, prefill {ratios['prefill']:.2f}")


if __name__ == "__main__":
    main()
