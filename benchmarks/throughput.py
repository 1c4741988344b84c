"""Offline throughput on SmolLM2-135M: the engine vs the reference generator's static batches vs
HF transformers `generate`, side by side in one run.

    python benchmarks/throughput.py [--num-requests 64] [--min-prompt 32] [--max-prompt 512]
                                    [--output-len 128] [--concurrency 32] [--skip-hf]

Workload: `--num-requests` prompts of random token ids with lengths uniform in
[min-prompt, max-prompt] (seeded), each generating exactly `--output-len` tokens (ignore_eos).

- engine:     `LLM.generate` on all requests at once (continuous batching, chunked prefill,
              max_num_seqs = concurrency); warm-up compiles are excluded.
- reference:  the dense-cache reference generator in static batches of `concurrency` prompts in
              arrival order; each batch pads to its longest prompt and runs until all its rows
              have their tokens. A first small batch compiles its shapes outside the timing.
- hf:         transformers `generate` (fp32, greedy, left padding, same static batches).
- decode:     the engine with `concurrency` requests of `--min-prompt` tokens: close to pure
              decode throughput at that concurrency.
- async:      that decode workload with async scheduling off and on, interleaved `--rounds` times
              (medians), beside the device-only bound: the same steps' inputs (recorded from a
              synchronous run) dispatched back to back with no scheduling, input building or
              output processing between them. Host ms/step is step time outside waiting for the
              device; with async on it overlaps the device's work.

Output tok/s counts generated tokens only. Host time per step is engine time outside waiting for
the device (scheduling, batch building, detokenizing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def workload(n, lo, hi, seed=0, vocab=49152):
    """n prompts of random ordinary token ids (below min(40000, vocab)), lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    top = min(40000, vocab)
    return [rng.integers(min(100, top // 2), top, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def bench_engine(llm, prompts, output_len):
    from jaxinfer import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    before = dict(llm.engine.counters)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - t0
    c = llm.engine.counters
    steps = c["steps"] - before["steps"]
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == len(prompts) * output_len
    return dict(seconds=elapsed, output_tok_s=generated / elapsed, steps=steps,
                host_ms_per_step=1000 * (c["host_seconds"] - before["host_seconds"]) / steps,
                device_ms_per_step=1000 * (c["device_seconds"] - before["device_seconds"]) / steps)


def bench_async(llm, prompts, output_len, rounds):
    """Decode with async scheduling off and on, interleaved; and the device-only bound."""
    import statistics

    import jax

    runner = llm.engine.runner
    default = runner.async_scheduling
    runs = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            runner.async_scheduling = mode == "on"
            runs[mode].append(bench_engine(llm, prompts, output_len))
    runner.async_scheduling = default
    plans = []  # the device-only bound: a synchronous run's steps, replayed back to back
    runner.async_scheduling, runner.step_hook = False, plans.append
    try:
        bench_engine(llm, prompts, output_len)
    finally:
        runner.async_scheduling, runner.step_hook = default, None
    bounds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for plan in plans:
            last = runner._dispatch(plan)
        jax.block_until_ready(last)
        bounds.append(time.perf_counter() - t0)
    out = {}
    for mode, rs in runs.items():
        if rs:
            out[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    seconds = statistics.median(bounds)
    out["device_only"] = dict(seconds=seconds, steps=len(plans), device_ms_per_step=1000 * seconds / len(plans),
                              output_tok_s=len(prompts) * output_len / seconds)
    return out


def bench_reference(llm, prompts, output_len, concurrency):
    from jaxinfer import SamplingParams
    from jaxinfer.reference import ReferenceGenerator

    runner = llm.engine.runner
    ref = ReferenceGenerator(llm.config, runner.graphdef, runner.params)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    batches = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
    for batch in batches:  # compile every batch's shapes outside the timing
        ref.warmup(batch_size=len(batch), prompt_len=max(map(len, batch)), max_tokens=output_len)
    t0 = time.perf_counter()
    generated = 0
    for batch in batches:
        generated += sum(len(g.token_ids) for g in ref.generate(batch, [params] * len(batch)))
    elapsed = time.perf_counter() - t0
    return dict(seconds=elapsed, output_tok_s=generated / elapsed, batches=len(batches))


def bench_hf(gguf_path, prompts, output_len, concurrency):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=torch.float32)
    model.eval()

    def run(batch):
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(batch)

    run([prompts[0][:8]])
    t0 = time.perf_counter()
    generated = sum(run(prompts[i:i + concurrency]) for i in range(0, len(prompts), concurrency))
    elapsed = time.perf_counter() - t0
    return dict(seconds=elapsed, output_tok_s=generated / elapsed)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="registered name or .gguf path (HF reads the same file)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024, help="engine context (raised to fit the workload)")
    ap.add_argument("--scan-layers", type=int, default=None, help="1 scanned, 0 unrolled (default: by backend)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved async off/on rounds (medians)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here too")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    import jax

    from jaxinfer import LLM

    max_len = args.max_prompt + args.output_len
    t0 = time.perf_counter()
    scan = None if args.scan_layers is None else bool(args.scan_layers)
    # Built with async scheduling so its graphs are compiled for the async rows; the other rows run
    # the engine's default for this backend.
    llm = LLM(args.model, dtype="float32", scan_layers=scan, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max(args.max_model_len, max_len),
              progress=False, async_scheduling=True)
    llm.engine.runner.async_scheduling = jax.default_backend() != "cpu"  # the default (EngineConfig docs)
    warm = time.perf_counter() - t0
    results = dict(date=datetime.date.today().isoformat(), device=f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, jax {jax.__version__} {jax.default_backend()}",
                   args=vars(args), load_and_warmup_s=warm, warmup_graphs=llm.engine.counters["warmup_graphs"],
                   scan_layers=llm.config.scan_layers)
    print(f"# loaded and warmed up in {warm:.0f} s ({results['warmup_graphs']} graphs)", flush=True)
    prompts = workload(args.num_requests, args.min_prompt, args.max_prompt, vocab=llm.config.vocab_size)
    results["engine"] = bench_engine(llm, prompts, args.output_len)
    print("engine", results["engine"], flush=True)
    short = workload(args.concurrency, args.min_prompt, args.min_prompt, seed=1, vocab=llm.config.vocab_size)
    results["decode"] = bench_engine(llm, short, args.output_len)
    print("decode", results["decode"], flush=True)
    results["async"] = bench_async(llm, short, args.output_len, args.rounds)
    print("async", results["async"], flush=True)
    if not args.skip_reference:
        results["reference"] = bench_reference(llm, prompts, args.output_len, args.concurrency)
        print("reference", results["reference"], flush=True)
    if not args.skip_hf:
        results["hf"] = bench_hf(llm.model_path, prompts, args.output_len, args.concurrency)
        print("hf", results["hf"], flush=True)
    e = results["engine"]["output_tok_s"]
    print("\n| system | output tok/s | vs engine |\n|---|---|---|")
    for name in ("engine", "reference", "hf"):
        if name in results:
            v = results[name]["output_tok_s"]
            print(f"| {name} | {v:.1f} | {v / e:.2f}x |")
    print(f"| decode-only at {args.concurrency} concurrent | {results['decode']['output_tok_s']:.1f} | |")
    print(f"engine host time per step: {results['engine']['host_ms_per_step']:.1f} ms "
          f"(device wait {results['engine']['device_ms_per_step']:.1f} ms)")
    a = results["async"]
    bound = a["device_only"]["output_tok_s"]
    print(f"\n| decode at {args.concurrency} concurrent (median of {args.rounds}) | output tok/s | vs device-only "
          f"| host ms/step | device wait ms/step |\n|---|---|---|---|---|")
    for mode in ("off", "on"):
        if mode in a:
            r = a[mode]
            print(f"| async scheduling {mode} | {r['output_tok_s']:.1f} | {r['output_tok_s'] / bound:.2f} "
                  f"| {r['host_ms_per_step']:.1f} | {r['device_ms_per_step']:.1f} |")
    print(f"| device-only bound ({a['device_only']['steps']} steps replayed) | {bound:.1f} | 1.00 | 0 "
          f"| {a['device_only']['device_ms_per_step']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
