"""The sampler's top-k / top-p filters: threshold search (what runs) vs sorting the vocabulary.

    python benchmarks/bench_sampler.py [--vocab 49152 128256 262144] [--batch-sizes 1 8 64] [--iters 20]

Each row times one jit-compiled sampling call on random logits with top_k=50, top_p=0.9 in
every row: `sample` (the filters as `keep_mask`'s threshold search; then with top-p alone, as
OpenAI clients send it, which skips the top-k search), the same draw with the
filters found by `mask_logits`' argsort, the unfiltered draw (the floor: temperature and a
categorical draw only), and HF transformers' TopK + TopP warpers with torch.multinomial on the
same logits (torch on the same device kind as JAX's default, when torch sees it). Median
milliseconds per call, all measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_ms(fn, iters: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256, 262144],
                    help="vocabulary sizes (SmolLM2, Llama 3, Gemma 3)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-hf", action="store_true", help="skip the torch / HF transformers column")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxinfer import sampling

    def sorted_filters(logits, temperature, top_k, top_p, keys):
        """The draw `sample` makes, with the kept set taken from the sorted definition."""
        masked, _ = sampling.mask_logits(logits, temperature, top_k, top_p)
        n_keep = jnp.sum(jnp.isfinite(masked), axis=-1)
        threshold = jnp.take_along_axis(masked, jnp.maximum(n_keep - 1, 0)[:, None], axis=-1)
        x = logits / temperature[:, None]
        return jax.vmap(jax.random.categorical)(keys, jnp.where(x >= threshold, x, -jnp.inf))

    variants = {
        "threshold (sample)": jax.jit(sampling.sample),
        "threshold, top-p only": jax.jit(lambda logits, t, k, p, keys: sampling.sample(logits, t, jnp.zeros_like(k),
                                                                                        p, keys)),
        "argsort": jax.jit(sorted_filters),
        "unfiltered": jax.jit(lambda logits, t, k, p, keys: sampling.sample(logits, t, jnp.zeros_like(k),
                                                                             jnp.ones_like(p), keys)),
    }
    torch = None
    if not args.no_hf:
        try:
            import torch
            from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
        except ImportError:
            print("(torch / transformers not installed: no HF column)")
    platform = jax.devices()[0].platform
    tdev = "cuda" if torch is not None and platform == "gpu" and torch.cuda.is_available() else "cpu"
    print(f"device: {jax.devices()[0].device_kind} ({platform}); jax {jax.__version__}"
          + (f"; torch on {tdev}" if torch is not None else ""))
    cols = list(variants) + (["HF warpers (torch)"] if torch is not None else [])
    print("\n| V | B | " + " | ".join(f"{c} ms" for c in cols) + " | argsort / threshold |")
    print("|---" * (len(cols) + 3) + "|")
    for V in args.vocab:
        for B in args.batch_sizes:
            rng = np.random.default_rng(0)
            logits_np = (rng.standard_normal((B, V)) * 3).astype(np.float32)
            logits = jnp.asarray(logits_np)
            t, k, p = jnp.ones(B), jnp.full(B, 50, jnp.int32), jnp.full(B, 0.9, jnp.float32)
            keys = sampling.step_keys(jnp.arange(B, dtype=jnp.uint32), jnp.zeros(B, jnp.int32))
            row = {name: median_ms(lambda f=f: jax.block_until_ready(f(logits, t, k, p, keys)), args.iters)
                   for name, f in variants.items()}
            if torch is not None:
                scores = torch.from_numpy(logits_np).to(tdev)
                warpers = (TopKLogitsWarper(50), TopPLogitsWarper(0.9))

                def hf():
                    s = scores
                    for w in warpers:
                        s = w(None, s)
                    out = torch.multinomial(torch.softmax(s, dim=-1), 1)
                    if tdev == "cuda":
                        torch.cuda.synchronize()
                    return out

                with torch.no_grad():
                    row["HF warpers (torch)"] = median_ms(hf, args.iters)
            cells = " | ".join(f"{row[c]:.2f}" for c in cols)
            print(f"| {V} | {B} | {cells} | {row['argsort'] / row['threshold (sample)']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
