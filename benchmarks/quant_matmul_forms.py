"""Which XLA form of a quantized matmul is fastest on this machine: SmolLM2's seven projections of
one decoder layer, run for 30 layers (separate weight arrays per layer, one compiled layer, as the
engine's per-layer loop runs them), at a few batch sizes, each form timed interleaved with float32.

    python benchmarks/quant_matmul_forms.py [--rows 1 8 32] [--rounds 5] [--layers 30]
    XLA_FLAGS=--xla_cpu_use_xnnpack=true python benchmarks/quant_matmul_forms.py   # a flag's effect

Forms (W = values * scale + offset per group of G inputs, `jaxinfer.quantization`):
    f32         x @ W with W stored float32 (the baseline: what the engine reads without quantization)
    dequant     W dequantized to float32 in the layer (an XLA fusion writes it), then one dot
    reduce      sum_k x[:, k] * W[k, :] as one fused multiply-reduce: W is never written out
    group_dot   per group: (x_g @ values_g) in float32, times scale, plus sum(x_g) * offset
    native      the C++ kernel behind XLA's FFI (`pallas_kernels.quantized_matmul_cpu`), q/k/v and gate/up
                one call each as the model makes them
    f32 native  float32 weights through the native float kernel (`pallas_kernels.float_matmul_cpu`, what
                the engine runs for float steps of 2-8 rows), calls grouped the same way
Prints ms per 30-layer step, the ratio to f32, and GB/s of stored weights read. --head also times
the tied output projection (x @ E.T, E float32 [49152, 576]) through XLA and the native float kernel.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quantization import pack_int4, quantize

D, F, NH, KH, L = 576, 1536, 576, 192, 30  # SmolLM2-135M: hidden, mlp, q heads * head_dim, kv heads * head_dim
SHAPES = {"wq": (D, NH), "wk": (D, KH), "wv": (D, KH), "wo": (NH, D), "w_gate": (D, F), "w_up": (D, F),
          "w_down": (F, D)}


def make_layer(rng, bits: int | None, group: int = 32):
    out = {}
    for name, (k, n) in SHAPES.items():
        w = rng.normal(size=(k, n)).astype(np.float32) * 0.02
        if bits is None:
            out[name] = jnp.asarray(w)
            continue
        t = quantize(w, bits=bits, group=group, axis=0)
        values = pack_int4(t.values, 0, group) if bits == 4 else t.values
        out[name] = (jnp.asarray(values), jnp.asarray(t.scale), jnp.asarray(t.offset if t.offset is not None
                                                                          else np.zeros_like(t.scale)))
    return out


def unpack(values, bits: int, group: int):
    if bits == 8:
        return values
    k2, n = values.shape
    g = values.reshape(k2 * 2 // group, group // 2, n)
    return jnp.concatenate([g & 0xF, g >> 4], axis=1).reshape(k2 * 2, n)


def matmul(form: str, x, w, bits: int, group: int):
    if form == "f32":
        return x @ w
    if form == "f32_native":
        from pallas_kernels.float_matmul_cpu import float_matmuls_cpu

        return float_matmuls_cpu(x, [w])[0]
    values, scale, offset = w
    if form == "native":
        from pallas_kernels.quantized_matmul_cpu import quantized_matmul_cpu

        return quantized_matmul_cpu(x, values, scale, offset, bits=bits)
    q = unpack(values, bits, group)
    K, N = q.shape
    qg = q.reshape(K // group, group, N).astype(jnp.float32)
    if form == "dequant":
        wf = (qg * scale[:, None] + offset[:, None]).reshape(K, N)
        return x @ wf
    if form == "reduce":
        wf = qg * scale[:, None] + offset[:, None]  # [K/G, G, N], fused into the reduce
        xg = x.reshape(x.shape[0], K // group, group)
        return jnp.einsum("mgk,gkn->mn", xg, wf, preferred_element_type=jnp.float32) if x.shape[0] > 1 else \
            jnp.sum(xg[0, :, :, None] * wf, axis=(0, 1))[None]
    if form == "group_dot":
        xg = x.reshape(x.shape[0], K // group, group)
        part = jnp.einsum("mgk,gkn->mgn", xg, qg)  # [M, K/G, N]
        return jnp.einsum("mgn,gn->mn", part, scale) + jnp.einsum("mg,gn->mn", xg.sum(-1), offset)
    raise ValueError(form)


def layer(form, bits, group, x, w):
    """The seven projections of a layer (the attention and MLP maths left out: only weights)."""
    mm = functools.partial(matmul, form, bits=bits, group=group)
    if form == "native":  # as the model calls it: q/k/v and gate/up one call each
        from pallas_kernels.quantized_matmul_cpu import quantized_matmuls_cpu

        many = lambda x, names: quantized_matmuls_cpu(x, [(*w[n], bits) for n in names])  # noqa: E731
    elif form == "f32_native":
        from pallas_kernels.float_matmul_cpu import float_matmuls_cpu

        many = lambda x, names: float_matmuls_cpu(x, [w[n] for n in names])  # noqa: E731
    else:
        many = lambda x, names: [mm(x, w[n]) for n in names]  # noqa: E731
    q, k, v = many(x, ("wq", "wk", "wv"))
    h = x + mm(q, w["wo"]) + 0 * (k.sum() + v.sum())
    g, u = many(h, ("w_gate", "w_up"))
    return h + mm(jax.nn.silu(g) * u, w["w_down"])


def stored_bytes(w) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=L)
    ap.add_argument("--forms", nargs="+", default=["dequant", "reduce", "group_dot", "native"])
    ap.add_argument("--head", action="store_true", help="also the tied output projection, XLA vs native float")
    return ap.parse_args(argv)


def time_head(rng, rows_list, rounds: int):
    """The tied embedding as the output projection at each row count: XLA's einsum vs the native kernel."""
    from pallas_kernels.float_matmul_cpu import float_matmuls_cpu

    emb = jnp.asarray(rng.normal(size=(49152, D)).astype(np.float32) * 0.02)
    fns = {"f32": jax.jit(lambda x, e: jnp.einsum("md,vd->mv", x, e, preferred_element_type=jnp.float32)),
           "f32 native": jax.jit(lambda x, e: float_matmuls_cpu(x, [e], transpose=True)[0])}
    print("\n| rows | head form | ms | vs f32 | GB/s |\n|---|---|---|---|---|")
    for rows in rows_list:
        x = jnp.asarray(rng.normal(size=(rows, D)).astype(np.float32))
        times = {n: [] for n in fns}
        for fn in fns.values():
            fn(x, emb).block_until_ready()
        for _ in range(rounds):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn(x, emb).block_until_ready()
                times[n].append(time.perf_counter() - t0)
        base = statistics.median(times["f32"])
        for n in fns:
            t = statistics.median(times[n])
            print(f"| {rows} | {n} | {t * 1e3:.2f} | {base / t:.2f}x | {emb.size * 4 / t / 1e9:.1f} |")


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    layers = args.layers
    weights = {None: [make_layer(rng, None) for _ in range(layers)], 8: [make_layer(rng, 8) for _ in range(layers)],
               4: [make_layer(rng, 4) for _ in range(layers)]}
    variants = [("f32", None)] + [("f32_native", None)] * ("native" in args.forms) + [
        (f, b) for b in (8, 4) for f in args.forms]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {layers} layers of SmolLM2 projections")
    for rows in args.rows:
        x0 = jnp.asarray(rng.normal(size=(rows, D)).astype(np.float32))
        fns = {v: jax.jit(functools.partial(layer, v[0], v[1], 32)) for v in variants}
        for v, fn in fns.items():  # compile and warm
            fn(x0, weights[v[1]][0]).block_until_ready()
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v, fn in fns.items():  # interleaved
                t0 = time.perf_counter()
                x = x0
                for i in range(layers):
                    x = fn(x, weights[v[1]][i])
                x.block_until_ready()
                times[v].append(time.perf_counter() - t0)
        base = statistics.median(times[("f32", None)])
        print(f"\n| rows | form | ms / {layers}-layer step | vs f32 | GB/s of stored weights |\n|---|---|---|---|---|")
        for v in variants:
            t = statistics.median(times[v])
            gbs = stored_bytes(weights[v[1]]) / t / 1e9
            name = v[0].replace("_", " ") if v[1] is None else f"int{v[1]} {v[0]}"
            print(f"| {rows} | {name} | {t * 1e3:.2f} | {base / t:.2f}x | {gbs:.1f} |")
    if args.head:
        time_head(rng, args.rows, args.rounds)


if __name__ == "__main__":
    main()
