"""Prefill and decode throughput of SmolLM2-135M on this machine, side by side with HF transformers
(and llama-cpp-python when it is installed), all on the same GGUF file.

    python benchmarks/bench_generate.py [--prompt-len 128] [--decode-steps 32] [--batch-sizes 1 8]

jaxinfer runs two ways: the engine itself (`LLM`'s continuous-batching engine over the paged KV
cache, stepped as `LLM.generate` steps it; its device and host time per decode step are printed
too), and its reference generator's jit steps (dense KV cache, static batch) with the host sync
after every decode step, with scanned and with unrolled layers. HF
transformers runs fp32 (dequantized from the same GGUF) two ways: a bare forward loop with its KV
cache and argmax per step (its floor), and `model.generate()` (greedy, fixed length; decode time =
generate time - prefill time), which is how its users decode.

The machine is shared and noisy, so the implementations are measured in interleaved rounds (one
repetition of each, then the next round) and each figure is the median over rounds: a slow
period hits every column alike. Decode tok/s counts every row of the batch.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


VOCAB = 49152  # token ids are drawn below min(40000, VOCAB): set from the model in main()
PARAMS_BYTES: dict[str, int] = {}  # engine name -> bytes of its parameters


def _prompt(batch, prompt_len):
    hi = min(40000, VOCAB)
    return np.random.default_rng(0).integers(min(100, hi // 2), hi, (batch, prompt_len))


def jaxinfer_runner(path, scan_layers):
    """(prefill seconds, decode seconds per step) measurements for one batch size."""
    from jaxinfer.loader import load_model
    from jaxinfer.reference import ReferenceGenerator, next_power_of_two

    m = load_model(path, dtype="float32", scan_layers=scan_layers, progress=False)
    gen = ReferenceGenerator(m.config, m.graphdef, m.params)
    del m

    def run(B, prompt_len, decode_steps):
        S = next_power_of_two(prompt_len + decode_steps + 1)
        tokens = _prompt(B, prompt_len).astype(np.int32)
        lengths = np.full((B,), prompt_len, np.int32)
        zeros_f, zeros_i, ones_f = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        seeds = np.zeros(B, np.uint32)
        t0 = time.perf_counter()
        cache, nxt = gen._prefill(gen.params, gen._empty_cache(B, S), tokens, lengths, zeros_f, zeros_i, ones_f,
                                  seeds)
        nxt = np.asarray(nxt)
        t_prefill = time.perf_counter() - t0
        pos = lengths.copy()
        t0 = time.perf_counter()
        for step in range(decode_steps):
            cache, nxt = gen._decode(gen.params, cache, nxt, pos, np.full(B, step + 1, np.int32),
                                     zeros_f, zeros_i, ones_f, seeds)
            nxt = np.asarray(nxt)  # the host sees every token, as generate() does
            pos = pos + 1
        return t_prefill, (time.perf_counter() - t0) / decode_steps

    return run


ENGINE_STEP_TIMES: dict[str, list[tuple[float, float]]] = {}  # name -> (device, host) s per decode step


def jaxinfer_engine(path, layer_loop, max_batch, name, max_model_len, **llm_kwargs):
    """The engine: (prefill seconds, decode seconds per step) for one batch size. `llm_kwargs`:
    quantization, kv_cache_dtype."""
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams

    # No prefix caching: every round sends the same prompts again. No warm-up of every step shape: the
    # untimed first round (main) compiles the shapes the rounds use, and only those.
    llm = LLM(path, layer_loop=layer_loop, max_num_seqs=max_batch, kv_cache_memory=256 << 20, warmup=False,
              progress=False, max_model_len=max_model_len, enable_prefix_caching=False, **llm_kwargs)
    PARAMS_BYTES[name] = llm.engine.memory()["params_bytes"]
    engine = llm.engine
    ENGINE_STEP_TIMES[name] = []
    calls = collections.Counter()

    def run(B, prompt_len, decode_steps):
        params = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        for ids in _prompt(B, prompt_len).tolist():
            engine.add_request(None, ids, params)
        started = 0
        while started < B:  # prefill: until every request has its first token
            started += sum(1 for o in engine.step() if o.outputs and o.outputs[0].token_ids)
        t_prefill = time.perf_counter() - t0
        c0 = dict(engine.counters)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        t_decode = time.perf_counter() - t0
        c = engine.counters
        steps = max(1, c["steps"] - c0["steps"])
        calls[B] += 1
        if B == 1 and calls[B] > 1:  # the first call (warm-up) compiles
            ENGINE_STEP_TIMES[name].append(((c["device_seconds"] - c0["device_seconds"]) / steps,
                                            (c["host_seconds"] - c0["host_seconds"]) / steps))
        return t_prefill, t_decode / decode_steps

    return run


def hf_runners(path):
    import torch
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

    @torch.inference_mode()
    def forward_loop(B, prompt_len, decode_steps):
        tokens = torch.from_numpy(_prompt(B, prompt_len))
        t0 = time.perf_counter()
        out = model(tokens, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return t_prefill, (time.perf_counter() - t0) / decode_steps

    @torch.inference_mode()
    def generate(B, prompt_len, decode_steps):
        tokens = torch.from_numpy(_prompt(B, prompt_len))
        t0 = time.perf_counter()
        model(tokens, use_cache=True)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                       max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1, pad_token_id=0)
        return t_prefill, max(time.perf_counter() - t0 - t_prefill, 1e-9) / decode_steps

    return forward_loop, generate


def llama_cpp_runner(path, prompt_len, decode_steps):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=prompt_len + decode_steps + 8, n_threads=os.cpu_count(), verbose=False)

    def run(B, prompt_len, decode_steps):
        if B != 1:
            return None
        tokens = _prompt(1, prompt_len)[0].tolist()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return t_prefill, (time.perf_counter() - t0) / decode_steps

    return run


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    ap.add_argument("--quantized", action="store_true",
                    help="engine columns with int8 / int4 weights and int8 KV pages (the default loop)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference generator and the scanned engine")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    from checkpoints.gguf import GGUFFile
    from jaxinfer.registry import resolve_model_path

    global VOCAB
    path = resolve_model_path(args.model)
    model_config = GGUFFile(path).model_config()
    VOCAB = model_config.vocab_size
    context = min(1024, model_config.max_position_embeddings)
    top = max(args.batch_sizes)
    runners = {"jaxinfer engine f32, default (layer_loop=hybrid on CPU)":
               jaxinfer_engine(path, None, top, "engine default", context)}
    if args.quantized:
        for label, kw in (("int8 weights", dict(quantization="int8")), ("int4 weights", dict(quantization="int4")),
                          ("f32, int8 KV", dict(kv_cache_dtype="int8")),
                          ("int4 weights, int8 KV", dict(quantization="int4", kv_cache_dtype="int8"))):
            runners[f"jaxinfer engine {label}"] = jaxinfer_engine(path, None, top, f"engine {label}", context, **kw)
    if not args.no_reference:
        runners |= {
            "jaxinfer engine f32, layer_loop=per_layer (the previous default)":
                jaxinfer_engine(path, "per_layer", top, "engine other", context),
            "jaxinfer reference generator f32, scanned layers": jaxinfer_runner(path, True),
            "jaxinfer reference generator f32, unrolled layers": jaxinfer_runner(path, False),
        }
    if not args.no_hf and importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
        import torch
        import transformers

        loop, generate = hf_runners(path)
        runners[f"HF transformers {transformers.__version__} fp32 (torch {torch.__version__}), forward loop"] = loop
        runners[f"HF transformers {transformers.__version__} fp32, generate()"] = generate
    elif not args.no_hf:
        print("HF transformers not installed: pip install -e '.[ref]' to compare", flush=True)
    if importlib.util.find_spec("llama_cpp"):
        runners["llama-cpp-python (Q4_1 as stored)"] = llama_cpp_runner(path, args.prompt_len, args.decode_steps)
    else:
        print("llama-cpp-python not installed: no llama.cpp column", flush=True)

    samples = {(name, b): [] for name in runners for b in args.batch_sizes}
    for b in args.batch_sizes:  # warm-up: compile every shape, fill caches
        for run in runners.values():
            run(b, args.prompt_len, args.decode_steps)
    for r in range(args.rounds):
        for b in args.batch_sizes:
            for name, run in runners.items():
                result = run(b, args.prompt_len, args.decode_steps)
                if result is not None:
                    samples[name, b].append(result)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def rates(name, b):
        s = samples[name, b]
        if not s:
            return float("nan"), float("nan")
        return (b * args.prompt_len / statistics.median(p for p, _ in s), b / statistics.median(d for _, d in s))

    baselines = [n for n in runners if n.startswith("HF")]
    print(f"\n{datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores | prompt {args.prompt_len} "
          f"tokens, {args.decode_steps} decode steps, median of {args.rounds} interleaved rounds\n")
    header = "| implementation | " + " | ".join(
        f"prefill tok/s B={b} | decode tok/s B={b}" for b in args.batch_sizes) + " |"
    header += "".join(f" decode B=1 vs {'HF loop' if 'loop' in n else 'HF generate()'} |" for n in baselines)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in runners:
        cells = [f"{x:,.1f}" for b in args.batch_sizes for x in rates(name, b)]
        line = f"| {name} | " + " | ".join(cells) + " |"
        for base in baselines:
            line += f" {rates(name, 1)[1] / rates(base, 1)[1]:.2f}x |"
        print(line)
    for name, times in ENGINE_STEP_TIMES.items():
        if times:
            print(f"{name} at B=1: device {statistics.median(d for d, _ in times) * 1e3:.1f} ms, "
                  f"host {statistics.median(h for _, h in times) * 1e3:.1f} ms per decode step, "
                  f"params {PARAMS_BYTES[name] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
