"""Prefill and decode throughput of SmolLM2-135M on this machine, side by side with HF transformers
(and llama-cpp-python when it is installed), all on the same GGUF file.

    python benchmarks/bench_generate.py [--prompt-len 128] [--decode-steps 32] [--batch-sizes 1 8]

jaxinfer runs its reference generator's jit steps (dense KV cache) exactly as `LLM.generate` does,
including the host sync after every decode step. HF transformers runs fp32 (dequantized from the
same GGUF) two ways: a bare forward loop with its KV cache and argmax per step (its floor), and
`model.generate()` (greedy, fixed length; decode time = generate time - prefill time), which is
how its users decode. Each figure is the median over repetitions; decode tok/s counts every row.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jaxinfer(path, prompt_len, decode_steps, batch_sizes, reps, scan_layers):
    from jaxinfer.loader import load_model
    from jaxinfer.reference import ReferenceGenerator, next_power_of_two

    m = load_model(path, dtype="float32", scan_layers=scan_layers, progress=False)
    gen = ReferenceGenerator(m.config, m.graphdef, m.params)
    rows = {}
    for B in batch_sizes:
        S = next_power_of_two(prompt_len + decode_steps + 1)
        rng = np.random.default_rng(0)
        tokens = rng.integers(100, 40000, (B, prompt_len)).astype(np.int32)
        lengths = np.full((B,), prompt_len, np.int32)
        zeros_f, zeros_i, ones_f = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        seeds = np.zeros(B, np.uint32)

        def prefill():
            cache = gen._empty_cache(B, S)
            cache, nxt = gen._prefill(gen.params, cache, tokens, lengths, zeros_f, zeros_i, ones_f, seeds)
            return cache, np.asarray(nxt)

        prefill()  # compile
        t_prefill = _median_time(prefill, reps)

        def decode_loop():
            cache, nxt = prefill()
            pos = lengths.copy()
            t0 = time.perf_counter()
            for step in range(decode_steps):
                cache, nxt = gen._decode(gen.params, cache, nxt, pos, np.full(B, step + 1, np.int32),
                                         zeros_f, zeros_i, ones_f, seeds)
                nxt = np.asarray(nxt)  # the host sees every token, as generate() does
                pos = pos + 1
            return (time.perf_counter() - t0) / decode_steps

        decode_loop()  # compile
        t_step = statistics.median(decode_loop() for _ in range(reps))
        rows[B] = (B * prompt_len / t_prefill, B / t_step)
    return rows


def bench_hf(path, prompt_len, decode_steps, batch_sizes, reps):
    import torch
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    rows, generate_rows = {}, {}
    for B in batch_sizes:
        tokens = torch.from_numpy(np.random.default_rng(0).integers(100, 40000, (B, prompt_len)))

        @torch.inference_mode()
        def prefill():
            out = model(tokens, use_cache=True)
            return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        prefill()
        t_prefill = _median_time(prefill, reps)

        @torch.inference_mode()
        def decode_loop():
            past, nxt = prefill()
            t0 = time.perf_counter()
            for _ in range(decode_steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / decode_steps

        decode_loop()
        t_step = statistics.median(decode_loop() for _ in range(reps))
        rows[B] = (B * prompt_len / t_prefill, B / t_step)

        @torch.inference_mode()
        def generate():  # how HF users decode: generate(), greedy, a fixed number of new tokens
            model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                           max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1,
                           pad_token_id=0)

        generate()
        t_generate = _median_time(generate, reps)
        generate_rows[B] = (B * prompt_len / t_prefill, B * decode_steps / max(t_generate - t_prefill, 1e-9))
    return rows, generate_rows


def bench_llama_cpp(path, prompt_len, decode_steps, reps):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=prompt_len + decode_steps + 8, n_threads=os.cpu_count(), verbose=False)
    tokens = np.random.default_rng(0).integers(100, 40000, prompt_len).tolist()

    def prefill():
        llm.reset()
        llm.eval(tokens)

    t_prefill = _median_time(prefill, reps)

    def decode_loop():
        prefill()
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return (time.perf_counter() - t0) / decode_steps

    t_step = statistics.median(decode_loop() for _ in range(reps))
    return {1: (prompt_len / t_prefill, 1 / t_step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    args = ap.parse_args()

    from jaxinfer.registry import resolve_model_path

    path = resolve_model_path(args.model)
    results = {}
    for scan in (True, False):
        label = f"jaxinfer f32 ({'scanned' if scan else 'unrolled'} layers)"
        results[label] = bench_jaxinfer(path, args.prompt_len, args.decode_steps, args.batch_sizes, args.reps, scan)
        print(label, results[label], flush=True)
    if not args.no_hf and importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
        import torch
        import transformers

        label = f"HF transformers {transformers.__version__} fp32, forward loop (torch {torch.__version__})"
        loop, generate = bench_hf(path, args.prompt_len, args.decode_steps, args.batch_sizes, args.reps)
        results[label] = loop
        results[f"HF transformers {transformers.__version__} fp32, generate()"] = generate
        print(label, loop, "generate()", generate, flush=True)
    else:
        print("HF transformers not installed: pip install -e '.[ref]' to compare", flush=True)
    if importlib.util.find_spec("llama_cpp"):
        label = "llama-cpp-python (Q4_1 as stored)"
        results[label] = bench_llama_cpp(path, args.prompt_len, args.decode_steps, args.reps)
        print(label, results[label], flush=True)
    else:
        print("llama-cpp-python not installed: no llama.cpp column", flush=True)

    baselines = [k for k in results if k.startswith("HF")]
    print(f"\n{datetime.date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
          f"prompt {args.prompt_len} tokens, {args.decode_steps} decode steps, median of {args.reps}\n")
    header = "| implementation | " + " | ".join(
        f"prefill tok/s B={b} | decode tok/s B={b}" for b in args.batch_sizes) + " |"
    for b in baselines:
        header += f" decode B=1 vs HF {b.split(', ')[1].split(' ')[0]} |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, rows in results.items():
        cells = []
        for b in args.batch_sizes:
            pre, dec = rows.get(b, (float("nan"), float("nan")))
            cells += [f"{pre:,.0f}", f"{dec:,.1f}"]
        line = f"| {label} | " + " | ".join(cells) + " |"
        for b in baselines:
            line += f" {rows[1][1] / results[b][1][1]:.2f}x |" if 1 in rows and 1 in results[b] else " |"
        print(line)


if __name__ == "__main__":
    main()
