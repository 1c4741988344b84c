"""The weight reads of a decode step at a real model's shape: bfloat16 vs int8 vs int4 weights at a
few batch sizes, against the device's copy bandwidth (the roofline of a memory-bound step).

    python benchmarks/bench_quantized_step.py                 # Llama-3-8B's shape, batch 1 / 8 / 64 (GPU / TPU)
    python benchmarks/bench_quantized_step.py --small         # a CPU-sized run (SmolLM2's shape, float32)

Per layer the projections run as the model calls them (`quantized_matmuls` for q / k / v and gate / up,
`quantized_matmul` for o and down, the platform's backend: the Pallas kernel on GPU / TPU, the native
kernel on CPU), then the lm_head once; attention and norms are left out, being what quantization does
not change. Weights are random, generated on the device in the layouts the loader produces: int8 with
one scale per output channel, int4 in groups of 32 inputs with scale and offset, two values a byte
(`jaxinfer.quantization`). The L layers are separate arrays in one jitted step, as the engine's unrolled
loop reads them. Per row: ms per step (median of trials of back-to-back steps), the stored bytes a step
reads, their GB/s and that as a share of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from benchmarks.bench_attention import copy_bandwidth  # noqa: E402
from pallas_kernels.quantized_matmul import matmul_backend, quantized_matmul, quantized_matmuls  # noqa: E402

SHAPES = {  # hidden, mlp, q heads x head dim, kv heads x head dim, layers, vocabulary
    "llama3-8b": dict(D=4096, F=14336, Q=4096, KV=1024, L=32, V=128256),
    "smollm2-135m": dict(D=576, F=1536, Q=576, KV=192, L=30, V=49152),
}
INT4_GROUP = 32
BITS = {"float": None, "int8": 8, "int4": 4}


def projections(s: dict) -> dict[str, tuple[int, int]]:
    """A layer's weights as [inputs, outputs]."""
    D, F, Q, KV = s["D"], s["F"], s["Q"], s["KV"]
    return {"wq": (D, Q), "wk": (D, KV), "wv": (D, KV), "wo": (Q, D), "w_gate": (D, F), "w_up": (D, F),
            "w_down": (F, D)}


@functools.partial(jax.jit, static_argnames=("k", "n", "fmt", "dtype", "transpose"))
def random_weight(key, *, k: int, n: int, fmt: str, dtype, transpose: bool = False):
    """One [k, n] weight (or [n, k] with transpose: the lm_head's layout) in `fmt`: a float array, or
    (values, scale, offset or None) as `quantized_matmul` takes them; values of the size a trained
    layer has (outputs ~ unit variance for unit inputs)."""
    kv_axis = 1 if transpose else 0
    shape = (n, k) if transpose else (k, n)
    if fmt == "float":
        return (jax.random.normal(key, shape, jnp.float32) / k ** 0.5).astype(dtype)
    groups = 1 if fmt == "int8" else k // INT4_GROUP
    scale_shape = (n, groups) if transpose else (groups, n)
    k1, k2 = jax.random.split(key)
    if fmt == "int8":
        values = jax.random.randint(k1, shape, -127, 128, jnp.int32).astype(jnp.int8)
        return values, jnp.full(scale_shape, 1.0 / (127 * k ** 0.5), jnp.float32), None
    packed = list(shape)
    packed[kv_axis] //= 2
    values = jax.random.randint(k1, packed, 0, 256, jnp.int32).astype(jnp.uint8)
    scale = jax.random.uniform(k2, scale_shape, jnp.float32, 0.5, 1.5) / (8 * k ** 0.5)
    return values, scale, -8 * scale


def make_weights(s: dict, fmt: str, dtype, seed: int = 0) -> dict:
    key = jax.random.key(seed)
    layers = []
    for i in range(s["L"]):
        keys = jax.random.split(jax.random.fold_in(key, i), 7)
        layers.append({name: random_weight(kk, k=k, n=n, fmt=fmt, dtype=dtype)
                       for kk, (name, (k, n)) in zip(keys, projections(s).items())})
    head = random_weight(jax.random.fold_in(key, s["L"]), k=s["D"], n=s["V"], fmt=fmt, dtype=dtype, transpose=True)
    return {"layers": layers, "head": head}


def stored_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # (a None offset is no leaf)


def step(x, weights, bits: int | None):
    """The projections of every layer, then the lm_head; returns the logits [B, V]. bits: None for
    float weights, else the quantized weights' (4 or 8)."""
    def many(x, ws):
        if bits is None:
            return [x @ w for w in ws]
        return quantized_matmuls(x, [(*w, bits) for w in ws], out_dtype=x.dtype)

    def one(x, w, transpose=False):
        if bits is None:
            return x @ (w.T if transpose else w)
        return quantized_matmul(x, *w, bits=bits, transpose=transpose, out_dtype=x.dtype)

    for p in weights["layers"]:
        q, k, v = many(x, (p["wq"], p["wk"], p["wv"]))
        h = x + one(q, p["wo"]) + 0 * (k.sum() + v.sum()).astype(x.dtype)
        gate, up = many(h, (p["w_gate"], p["w_up"]))
        x = h + one(jax.nn.silu(gate) * up, p["w_down"])
    return one(x, weights["head"], transpose=True)


@functools.partial(jax.jit, static_argnames=("bits", "iters", "backend"))
def steps(x, weights, *, bits: int | None, iters: int, backend: str):
    """`iters` steps back to back in one dispatch (each step's input depends on the last's logits, so
    none is hoisted): the time is the device's, not the host's flattening of ~900 weight arrays."""
    def body(_, x):
        return x + 0 * step(x, weights, bits)[:, :1].astype(x.dtype)

    with matmul_backend(backend):
        return jax.lax.fori_loop(0, iters, body, x)


def time_steps(x, weights, fmt: str, *, iters: int, trials: int, backend: str) -> float:
    """Median over trials of the seconds per step."""
    run = functools.partial(steps, bits=BITS[fmt], iters=iters, backend=backend)
    jax.block_until_ready(run(x, weights))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, weights))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (a quicker run)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--formats", nargs="+", choices=list(BITS), default=list(BITS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "pallas_gpu", "pallas_tpu"],
                    help="quantized_matmul's backend (auto: the platform's; a Pallas one off its platform interprets)")
    ap.add_argument("--small", action="store_true", help="SmolLM2's shape in float32 (a CPU run)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shape = dict(SHAPES["smollm2-135m" if args.small else args.shape])
    if args.layers:
        shape["L"] = args.layers
    dtype = jnp.float32 if args.small or jax.default_backend() == "cpu" else jnp.bfloat16
    dev = jax.devices()[0]
    copy = max(copy_bandwidth(1 << 26 if args.small else 1 << 30).values())
    float_name = jnp.dtype(dtype).name
    print(f"{datetime.date.today().isoformat()} | {dev.device_kind} ({dev.platform}) | jax {jax.__version__} | "
          f"{'smollm2-135m' if args.small else args.shape} shape, {shape['L']} layers, activations {float_name} | "
          f"copy bandwidth {copy / 1e9:.0f} GB/s\n")
    print("| batch | weights | ms / step | vs float | stored GB a step | GB/s | % of copy bandwidth |")
    print("|---|---|---|---|---|---|---|")
    weights = {}
    for fmt in args.formats:
        weights[fmt] = make_weights(shape, fmt, dtype)
        jax.block_until_ready(weights[fmt])
    for batch in args.batch_sizes:
        x = jax.random.normal(jax.random.key(batch), (batch, shape["D"]), jnp.float32).astype(dtype)
        times = {fmt: time_steps(x, weights[fmt], fmt, iters=args.iters, trials=args.trials, backend=args.backend)
                 for fmt in args.formats}
        for fmt in args.formats:
            nbytes, t = stored_bytes(weights[fmt]), times[fmt]
            base = times.get("float")
            name = float_name if fmt == "float" else fmt
            print(f"| {batch} | {name} | {t * 1e3:.3f} | {f'{base / t:.2f}x' if base else '-'} | {nbytes / 1e9:.2f} "
                  f"| {nbytes / t / 1e9:.0f} | {100 * nbytes / t / copy:.0f}% |")


if __name__ == "__main__":
    main()
