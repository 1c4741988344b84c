"""Attention kernel benchmark: the Pallas kernel against the XLA reference and the bandwidth limit.

For decode batches (one query per sequence) and mixed batches (decodes plus prefill chunks) of
batch x context shapes, on the device at hand, per shape:

    time             median over trials of the mean of `--iters` calls in one jitted loop
                     (device time, no host dispatch; the sweep times back-to-back calls)
    KV GB/s          KV bytes the batch must read (every sequence's K and V once) / time
    % copy           that bandwidth over the device's copy bandwidth, measured in the same run
                     (the best of a JAX copy and, where torch is installed, torch's copy_)
    x XLA            speedup over the XLA reference (`ragged_paged_attention_reference`: page
                     gather + einsum)

    python benchmarks/bench_attention.py                         # Llama-3-8B heads on GPU/TPU
    python benchmarks/bench_attention.py --small                 # a CPU-sized smoke run
    python benchmarks/bench_attention.py --sweep                 # block-size sweep on one shape

Shapes default to Llama-3-8B heads: 32 query / 8 KV heads, head dim 128, bf16, page 16, batch
{1, 8, 64} x context {512, 2k, 8k}. The cache is a stacked [2, P, page, K, H] pool read at layer 1
with the pages of each sequence randomly permuted, as in the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from pallas_kernels import ops  # noqa: E402
from pallas_kernels.paged_attention_reference import ragged_paged_attention_reference  # noqa: E402


@dataclasses.dataclass
class Batch:
    kind: str
    batch: int
    context: int
    args: tuple
    q_block: int
    kv_bytes: int
    flops: float


def make_batch(kind, batch, context, *, N, K, H, page, dtype, chunk=256, seed=0) -> Batch:
    """`batch` sequences of `context` tokens; decode: one new token each; mixed: the same decodes
    plus 2 prefill chunks of `chunk` new tokens at `context`."""
    rng = np.random.default_rng(seed)
    q_lens = [1] * batch + ([chunk, chunk] if kind == "mixed" else [])
    kv_lens = [context] * len(q_lens)
    pages = [-(-n // page) for n in kv_lens]
    P = sum(pages) + 1
    perm = rng.permutation(np.arange(1, P)).astype(np.int32)
    table = np.zeros((len(q_lens), max(pages)), np.int32)
    at = 0
    for s, n in enumerate(pages):
        table[s, :n] = perm[at:at + n]
        at += n
    key = jax.random.PRNGKey(seed)
    kk, kv, kq = jax.random.split(key, 3)
    k_cache = jax.random.normal(kk, (2, P, page, K, H), dtype)
    v_cache = jax.random.normal(kv, (2, P, page, K, H), dtype)
    T = sum(q_lens)
    q = jax.random.normal(kq, (T, N, H), dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    args = (q, k_cache, v_cache, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table), jnp.asarray(cu),
            jnp.int32(len(q_lens)))
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * sum(kv_lens) * K * H * itemsize
    flops = 4.0 * N * H * sum(ql * n for ql, n in zip(q_lens, kv_lens))  # upper bound (no causal saving)
    return Batch(kind, batch, context, args, 1 if kind == "decode" else 32, kv_bytes, flops)


def timeit(fn, *args, iters=20, trials=5) -> float:
    """Median over trials of the mean time of `iters` back-to-back calls (seconds)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def timeit_on_device(fn, q, *rest, iters=20, trials=5) -> float:
    """Like `timeit`, but the `iters` calls run in one jitted loop, so host dispatch (tens of us
    per call, more than a small batch's attention) is not counted: the figure is device time, as
    inside the engine's step. Each call's q depends on the previous output (no hoisting)."""
    def loop(q, *rest):
        def body(_, carry):
            return fn(q + carry * 0, *rest)[:1, :1, :1].astype(q.dtype)
        return jax.lax.fori_loop(0, iters, body, jnp.zeros((1, 1, 1), q.dtype))

    looped = jax.jit(loop)
    jax.block_until_ready(looped(q, *rest))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(looped(q, *rest))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30, iters=20, trials=5) -> dict:
    """Device copy bandwidth in bytes/s (read + write): JAX's x + 1 and torch's copy_ if present."""
    x = jnp.zeros(nbytes // 4, jnp.float32)
    out = {"jax_x_plus_1": 2 * nbytes / timeit(jax.jit(lambda a: a + 1), x, iters=iters, trials=trials)}
    del x
    if jax.default_backend() == "gpu":
        try:
            import torch

            src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
            dst = torch.empty_like(src)
            for _ in range(3):
                dst.copy_(src)
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(iters):
                    dst.copy_(src)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / iters)
            out["torch_copy"] = 2 * nbytes / statistics.median(times)
            del src, dst
            torch.cuda.empty_cache()
        except Exception as e:  # torch absent or without CUDA: the JAX figure stands alone
            print(f"(torch copy not measured: {e})", file=sys.stderr)
    return out


def kernel_fn(backend, q_block, layer=1, **kw):
    def f(q, kc, vc, lens, table, cu, n):
        if backend == "xla":
            return ragged_paged_attention_reference(q, kc, vc, lens, table, cu, n, layer=layer, q_block=q_block)
        return ops.ragged_paged_attention(q, kc, vc, lens, table, cu, n, layer=layer, q_block=q_block,
                                          backend=backend, **kw)
    return jax.jit(f)


def gpu_kernel_fn(q_block, **kw):
    from pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu

    return jax.jit(functools.partial(ragged_paged_attention_gpu, layer=1, q_block=q_block, **kw))


def run_table(args, copy_bw):
    dtype = jnp.dtype(args.dtype)
    rows = []
    for kind in args.kinds:
        for batch in args.batches:
            for context in args.contexts:
                b = make_batch(kind, batch, context, N=args.heads, K=args.kv_heads, H=args.head_dim,
                               page=args.page, dtype=dtype)
                timed = functools.partial(timeit_on_device, iters=args.iters, trials=args.trials)
                t_kernel = timed(kernel_fn(args.backend, b.q_block), *b.args)
                t_xla = (timed(kernel_fn("xla", b.q_block), *b.args) if args.xla
                         else float("nan"))
                bw = b.kv_bytes / t_kernel
                row = dict(kind=kind, batch=batch, context=context, kv_mb=b.kv_bytes / 1e6, us=t_kernel * 1e6,
                           gbs=bw / 1e9, pct_copy=100 * bw / copy_bw, xla_us=t_xla * 1e6, speedup=t_xla / t_kernel,
                           tflops=b.flops / t_kernel / 1e12)
                rows.append(row)
                print(f"| {kind} | {batch} | {context} | {row['kv_mb']:.1f} | {row['us']:.1f} | {row['gbs']:.0f} | "
                      f"{row['pct_copy']:.0f}% | {row['xla_us']:.1f} | {row['speedup']:.2f}x | "
                      f"{row['tflops']:.1f} |", flush=True)
                del b
    return rows


def run_sweep(args, copy_bw):
    dtype = jnp.dtype(args.dtype)
    b = make_batch("decode", args.sweep_batch, args.sweep_context, N=args.heads, K=args.kv_heads,
                   H=args.head_dim, page=args.page, dtype=dtype)
    results = []
    for block_kv in (64, 128):
        for num_warps in (4, 8):
            for num_stages in (2, 3, 4):
                for num_splits in (1, 2, 4):
                    try:
                        t = timeit(gpu_kernel_fn(1, block_kv=block_kv, num_warps=num_warps, num_stages=num_stages,
                                                 num_splits=num_splits), *b.args, iters=args.iters, trials=3)
                    except Exception as e:  # a config Triton cannot compile (registers, shared memory)
                        print(f"block_kv={block_kv} warps={num_warps} stages={num_stages} splits={num_splits}: "
                              f"{type(e).__name__}", flush=True)
                        continue
                    pct = 100 * b.kv_bytes / t / copy_bw
                    results.append((t, block_kv, num_warps, num_stages, num_splits))
                    print(f"block_kv={block_kv} warps={num_warps} stages={num_stages} splits={num_splits}: "
                          f"{t * 1e6:.1f} us ({pct:.0f}% copy)", flush=True)
    results.sort()
    print("best:", results[:5])
    decompose(b, results[:3], args)
    return results


def decompose(b, configs, args):
    """Where the time goes for the best configs: the whole op vs the kernel on packed blocks."""
    from pallas_kernels.ragged_blocks import pack_queries
    from pallas_kernels.ragged_paged_attention_gpu import attend_blocks_gpu, padded_group

    q, kc, vc, lens, table, cu, n = b.args
    N, H, K = q.shape[1], q.shape[2], kc.shape[-2]
    pack = jax.jit(functools.partial(pack_queries, num_kv_heads=K, q_block=1, padded_group=padded_group(1, N // K)))
    blocks = pack(q, lens, cu, n)
    print(f"pack only: {timeit(pack, q, lens, cu, n, iters=50, trials=7) * 1e6:.1f} us")
    for _, block_kv, num_warps, num_stages, num_splits in configs:
        cfg = dict(block_kv=block_kv, num_warps=num_warps, num_stages=num_stages, num_splits=num_splits)
        whole = timeit(gpu_kernel_fn(1, **cfg), *b.args, iters=50, trials=7)
        kern = jax.jit(lambda bl, kc, vc, t: attend_blocks_gpu(bl, kc, vc, t, 1, sliding_window=None,
                                                               sm_scale=H ** -0.5, soft_cap=None, interpret=False,
                                                               **cfg))
        only = timeit(kern, blocks, kc, vc, table, iters=50, trials=7)
        print(f"{cfg}: whole op {whole * 1e6:.1f} us, kernel on packed blocks {only * 1e6:.1f} us "
              f"({100 * b.kv_bytes / only / args.copy_bw:.0f}% copy)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", help="pallas_kernels.ops backend of the kernel column")
    p.add_argument("--kinds", nargs="+", default=["decode", "mixed"], choices=["decode", "mixed"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, help="calls per timed trial (default 20; 3 with --small)")
    p.add_argument("--trials", type=int, help="timed trials per figure, median taken (default 5; 3 with --small)")
    p.add_argument("--no-xla", dest="xla", action="store_false", help="skip the XLA reference column")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized shapes (batch 1, 4 x context 128, 512; f32) and a 256 MB copy")
    p.add_argument("--sweep", action="store_true", help="GPU kernel block-size sweep on one decode shape")
    p.add_argument("--sweep-batch", type=int, default=64)
    p.add_argument("--sweep-context", type=int, default=2048)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.small:
        args.batches, args.contexts, args.dtype = [1, 4], [128, 512], "float32"
    args.iters = args.iters or (3 if args.small else 20)
    args.trials = args.trials or (3 if args.small else 5)
    device = jax.devices()[0]
    print(f"# {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}, backend {args.backend} -> {ops.resolve_backend(args.backend)}")
    copies = copy_bandwidth(1 << 28 if args.small else 1 << 30, iters=args.iters, trials=args.trials)
    copy_bw = max(copies.values())
    print("# copy bandwidth: " + ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in copies.items()))
    result = {"device": device.device_kind, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
              "copy_bandwidth": copies}
    args.copy_bw = copy_bw
    if args.sweep:
        result["sweep"] = run_sweep(args, copy_bw)
    else:
        print("| kind | batch | context | KV MB | kernel us | KV GB/s | % copy | XLA us | x XLA | TFLOP/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        result["rows"] = run_table(args, copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
