"""Serving benchmark: load an OpenAI-compatible server with streaming completions and measure it.

The metrics are those of `vllm bench serve` (same definitions, JSON keys and table), so numbers
compare side by side:

- TTFT: time from sending a request to its first token chunk.
- TPOT: (E2EL - TTFT) / (output tokens - 1) per request, the first token excluded.
- ITL: every gap between consecutive token chunks of a request, over all requests.
- E2EL: time from sending a request to its last token chunk.
- throughput: completed requests, output tokens, and input + output tokens per second of the run.

Prompts are token ids drawn (seeded) from the model's ordinary vocabulary, so input lengths are
exact; only the tokenizer metadata is read locally, never the weights. Examples:

    # a server started elsewhere: 200 requests of 512 -> 128 tokens arriving at 4 req/s (Poisson)
    python server.py --model smollm2-135m --port 8000 &
    python benchmarks/serving.py --model smollm2-135m --port 8000 --num-prompts 200 \\
        --random-input-len 512 --random-output-len 128 --request-rate 4 --ignore-eos --save-result

    # prompts sharing 4 system prefixes of 256 tokens (exercises the prefix cache), 8 at a time
    python benchmarks/serving.py --dataset-name shared-prefix --prefix-len 256 --num-prefixes 4 \\
        --random-input-len 64 --max-concurrency 8 --ignore-eos

    # throughput and latency against concurrency: results JSON plus a two-panel PNG
    python benchmarks/serving.py --sweep-concurrency 1,2,4,8,16,32 --num-prompts 64 --ignore-eos \\
        --save-result --result-dir results --plot results/sweep.png

    # one run: the offline engine vs server.py (started with the same engine settings, stopped at
    # the end) at saturation on the same workload, 3 alternating repeats, then a concurrency sweep
    python benchmarks/serving.py --compare-offline --model smollm2-135m --max-num-seqs 32 \\
        --max-num-batched-tokens 512 --num-prompts 64 --random-input-len 256 --random-output-len 128 \\
        --repeats 3 --sweep-concurrency 1,4,16,32 --save-result --result-dir results

Every measured run (repeat, sweep point) sends its own variant of the workload: the same lengths,
other token ids, so that no run is served from an earlier run's prefix-cache pages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METRICS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
_NORMAL_TOKEN = 1  # tokenizer.ggml.token_type of ordinary tokens


# ---- workload ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.token_ids)


def load_vocab(model: str) -> np.ndarray:
    """Ids of the ordinary (non-special) tokens of a registered model, .gguf file or checkpoint."""
    from jaxinfer.registry import resolve_model_path
    from jaxinfer.tokenizer import from_gguf_metadata

    path = resolve_model_path(model)
    if os.path.isdir(path):
        from checkpoints.orbax_io import read_tokenizer_metadata

        meta = read_tokenizer_metadata(path)
    else:
        from checkpoints.gguf import GGUFFile

        meta = GGUFFile(path).metadata
    tok = from_gguf_metadata(meta, source=path)
    ids = np.arange(tok.vocab_size)
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) == tok.vocab_size:
        return ids[np.asarray(types) == _NORMAL_TOKEN]
    special = {tok.bos_token_id, *tok.eos_token_ids}
    return np.array([i for i in ids if i not in special])


def _lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> np.ndarray:
    """n lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    lo, hi = max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, n)


# Lengths come from `seed`, token ids from (seed, variant): variants of a workload have the same
# shape and different tokens, so that no run finds an earlier run's prompts in the prefix cache.


def random_dataset(vocab, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   prefix_len: int = 0, seed: int = 0, variant: int = 0) -> list[Prompt]:
    """Random prompts: one common prefix of `prefix_len` tokens, then `input_len` (+- range) random tokens."""
    rng, tokens = np.random.default_rng(seed), np.random.default_rng([seed, variant])
    ins, outs = _lengths(rng, num_prompts, input_len, range_ratio), _lengths(rng, num_prompts, output_len, range_ratio)
    prefix = tokens.choice(vocab, prefix_len).tolist()
    return [Prompt(prefix + tokens.choice(vocab, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


def shared_prefix_dataset(vocab, num_prompts: int, num_prefixes: int, prefix_len: int, suffix_len: int,
                          output_len: int, range_ratio: float = 0.0, seed: int = 0, variant: int = 0) -> list[Prompt]:
    """Prompt i is prefix i % num_prefixes (`prefix_len` random tokens) followed by its own random suffix."""
    rng, tokens = np.random.default_rng(seed), np.random.default_rng([seed, variant])
    ins, outs = _lengths(rng, num_prompts, suffix_len, range_ratio), _lengths(rng, num_prompts, output_len, range_ratio)
    prefixes = [tokens.choice(vocab, prefix_len).tolist() for _ in range(num_prefixes)]
    return [Prompt(prefixes[k % num_prefixes] + tokens.choice(vocab, int(i)).tolist(), int(o))
            for k, (i, o) in enumerate(zip(ins, outs))]


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s after the start) of n requests: all 0 at an infinite rate; else the first at 0
    and gamma-distributed gaps of mean 1 / rate and shape `burstiness` (1: a Poisson process,
    exponential gaps; < 1 burstier, > 1 more regular)."""
    if math.isinf(request_rate) or n == 0:
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# ---- client ---------------------------------------------------------------------------------


@dataclasses.dataclass
class RequestResult:
    input_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # s
    itl: list[float] = dataclasses.field(default_factory=list)  # s, gaps between token chunks
    latency: float = 0.0  # s, to the last token chunk
    error: str = ""


async def send_request(session, url: str, payload: dict, input_len: int) -> RequestResult:
    """One streaming completion; times every chunk that carries a token."""
    import aiohttp

    res, chunks = RequestResult(input_len=input_len), 0
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return res
            async for raw in resp.content:  # one SSE line at a time
                now, line = time.perf_counter(), raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                    return res
                if chunk.get("choices"):  # a token chunk (its text may be empty: bytes held back)
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: bad JSON or UTF-8
        res.error = f"{type(e).__name__}: {e}"
        return res
    if chunks == 0:
        res.error = "the response streamed no token"
        return res
    res.latency, res.success = last - start, True
    res.output_tokens = res.output_tokens or chunks  # without usage: one token per chunk
    return res


async def run_workload(url: str, model: str, prompts: list[Prompt], *, request_rate: float = math.inf,
                       burstiness: float = 1.0, max_concurrency: int | None = None, warmups: list[Prompt] = (),
                       ignore_eos: bool = False, sampling: dict | None = None, seed: int = 0,
                       api_key: str | None = None) -> tuple[list[RequestResult], float]:
    """Sends `prompts` at their arrival times (at most `max_concurrency` in flight) after the
    uncounted `warmups`, with `api_key` as the bearer token if given; returns the results and the
    run's duration in s."""
    import aiohttp

    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

    async def one(session, p: Prompt) -> RequestResult:
        payload = {"model": model, "prompt": p.token_ids, "max_tokens": p.output_len, "stream": True,
                   "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos, **(sampling or {})}
        async with gate:
            return await send_request(session, url, payload, p.input_len)

    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=6 * 3600),
                                     headers=headers) as session:
        if warmups:
            warm = await asyncio.gather(*(one(session, p) for p in warmups))
            if not any(r.success for r in warm):
                raise RuntimeError(f"every warm-up request failed, e.g. {warm[0].error}")
        tasks, t0 = [], time.perf_counter()
        for p, at in zip(prompts, arrival_times(len(prompts), request_rate, burstiness, seed)):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, p)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


# ---- metrics --------------------------------------------------------------------------------


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def compute_metrics(results: list[RequestResult], duration: float, percentiles=(50, 99),
                    selected=("ttft", "tpot", "itl", "e2el")) -> dict:
    """The run's metrics, keyed as `vllm bench serve` keys them (times in ms)."""
    ok = [r for r in results if r.success]
    samples = {"ttft": [r.ttft for r in ok],
               "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
               "itl": [gap for r in ok for gap in r.itl],
               "e2el": [r.latency for r in ok]}
    total_in, total_out = sum(r.input_len for r in ok), sum(r.output_tokens for r in ok)
    m = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
         "total_input_tokens": total_in, "total_output_tokens": total_out,
         "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
         "total_token_throughput": (total_in + total_out) / duration}
    for name in selected:
        ms = np.asarray(samples[name] or [0.0]) * 1000.0
        m |= {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
              f"std_{name}_ms": float(ms.std())}
        m |= {f"p{_pct_name(p)}_{name}_ms": float(np.percentile(ms, p)) for p in percentiles}
    m |= {"input_lens": [r.input_len for r in results], "output_lens": [r.output_tokens for r in results],
          "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results], "errors": [r.error for r in results]}
    return m


def format_table(m: dict, percentiles=(50, 99), selected=("ttft", "tpot", "itl", "e2el"),
                 max_concurrency: int | None = None) -> str:
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]
    row = lambda k, v: lines.append(f"{k:<40} {v:<10}")  # noqa: E731
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if max_concurrency:
        row("Maximum request concurrency:", max_concurrency)
    row("Benchmark duration (s):", f"{m['duration']:.2f}")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", f"{m['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}")
    row("Total Token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")
    for name in selected:
        short, header = METRICS[name]
        lines.append("{:-^50}".format(header))
        row(f"Mean {short} (ms):", f"{m[f'mean_{name}_ms']:.2f}")
        row(f"Median {short} (ms):", f"{m[f'median_{name}_ms']:.2f}")
        for p in percentiles:
            row(f"P{_pct_name(p)} {short} (ms):", f"{m[f'p{_pct_name(p)}_{name}_ms']:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def plot_sweep(runs: list[dict], path: str, percentiles=(50, 99)) -> None:
    """Two panels against max concurrency: output throughput, and median (solid) and highest
    percentile (dashed) TTFT / TPOT / E2EL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["max_concurrency"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(conc, [r["output_throughput"] for r in runs], "o-")
    left.set(xlabel="max concurrency", ylabel="output tokens/s", title="Output throughput")
    top = _pct_name(max(percentiles)) if max(percentiles) > 50 else None
    for i, name in enumerate(("ttft", "tpot", "e2el")):
        if f"median_{name}_ms" in runs[0]:
            right.plot(conc, [r[f"median_{name}_ms"] for r in runs], "o-", color=f"C{i}",
                       label=f"median {name.upper()}")
        if top and f"p{top}_{name}_ms" in runs[0]:
            right.plot(conc, [r[f"p{top}_{name}_ms"] for r in runs], "s--", color=f"C{i}", alpha=0.6,
                       label=f"p{top} {name.upper()}")
    right.set(xlabel="max concurrency", ylabel="ms", title="Latency", yscale="log")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc], minor=False)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- served vs offline ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(model: str, *, port: int, max_num_seqs: int, max_num_batched_tokens: int, dtype: str | None = None,
                  served_model_name: str | None = None, timeout: float = 900.0, log_path: str | None = None):
    """Runs server.py in a subprocess until /health answers; yields its base URL; stops it (SIGTERM)."""
    cmd = [sys.executable, os.path.join(REPO, "server.py"), "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens)]
    cmd += ["--dtype", dtype] if dtype else []
    cmd += ["--served-model-name", served_model_name] if served_model_name else []
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                state = f"exited with status {proc.returncode}" if proc.poll() is not None else "is not ready"
                raise RuntimeError(f"the server {state} ({' '.join(cmd)}); its output ends:\n{tail}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def run_offline(llm, prompts: list[Prompt]) -> dict:
    """The workload through `LLM.generate`, all requests at once: duration and throughput."""
    from jaxinfer import SamplingParams

    params = [SamplingParams(max_tokens=p.output_len, temperature=0.0, ignore_eos=True) for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts], params)
    duration = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration": duration, "total_output_tokens": tokens, "output_throughput": tokens / duration,
            "request_throughput": len(prompts) / duration}


def _offline_worker(conn, model: str, dtype: str | None, engine: dict, warmups: list) -> None:
    """Child process holding the offline engine: warms up, reports its backend, then runs each
    workload received ([(token ids, output len)]) until None."""
    import jax

    from jaxinfer import LLM

    llm = LLM(model, dtype=dtype, progress=False, **engine)
    run_offline(llm, [Prompt(ids, out) for ids, out in warmups])
    conn.send(jax.default_backend())
    while (raw := conn.recv()) is not None:
        conn.send(run_offline(llm, [Prompt(ids, out) for ids, out in raw]))


def compare_offline(args, workload, model_name: str, then=None) -> dict:
    """Offline vs served output throughput at saturation, `args.repeats` times each (repeat r on
    `workload(r + 1)` both ways; `workload(0)` warms up); then `then(base_url)` (e.g. a
    concurrency sweep) while the server is still up.

    The offline engine lives in a child process so that its device memory is released before the
    server starts on an accelerator; on CPU both stay up and the repetitions alternate."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    engine = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    raw = lambda ps: [(p.token_ids, p.output_len) for p in ps]  # noqa: E731
    num_warmups = max(args.num_warmups, args.max_num_seqs)
    warmups = [Prompt(p.token_ids, min(p.output_len, 4)) for p in workload(0)[:num_warmups]]
    worker = ctx.Process(target=_offline_worker, args=(child_conn, args.model, args.dtype, engine, raw(warmups)),
                         daemon=True)
    worker.start()

    def offline_run(r: int) -> dict:
        conn.send(raw(workload(r + 1)))
        return conn.recv()

    offline, served = [], []
    try:
        backend = conn.recv()
        alternate = backend == "cpu"
        if not alternate:
            offline = [offline_run(r) for r in range(args.repeats)]
            conn.send(None)
            worker.join()
        with launch_server(args.model, port=args.port or free_port(), dtype=args.dtype, timeout=args.server_timeout,
                           served_model_name=args.served_model_name, **engine) as base:
            for r in range(args.repeats):
                if alternate:
                    offline.append(offline_run(r))
                results, duration = asyncio.run(run_workload(
                    base + args.endpoint, model_name, workload(r + 1), ignore_eos=True, seed=args.seed,
                    sampling={"temperature": 0.0}, warmups=warmups if r == 0 else ()))  # as offline: greedy
                served.append(compute_metrics(results, duration, args.metric_percentiles, args.percentile_metrics))
                print(f"repeat {r + 1}/{args.repeats}: offline {offline[r]['output_throughput']:.1f} tok/s, "
                      f"served {served[r]['output_throughput']:.1f} tok/s ({served[r]['failed']} failed)", flush=True)
            extra = {"sweep": then(base)} if then else {}
    except EOFError:
        raise RuntimeError(f"the offline engine process died (exit status {worker.exitcode})") from None
    finally:
        if worker.is_alive():
            conn.send(None)
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    off = float(np.median([o["output_throughput"] for o in offline]))
    srv = float(np.median([s["output_throughput"] for s in served]))
    return {"platform": backend, "order": "alternating" if alternate else "offline first",
            "repeats": args.repeats, "offline": offline, "served": served,
            "offline_output_throughput": off, "served_output_throughput": srv, "http_overhead": 1.0 - srv / off,
            "max_overhead": args.max_overhead, "within_max_overhead": 1.0 - srv / off <= args.max_overhead, **extra}


# ---- command line -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=None, help="default 8000 (--compare-offline: a free port)")
    a("--endpoint", default="/v1/completions")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY"),
      help="bearer key for a server started with --api-key (default: $OPENAI_API_KEY)")
    a("--model", default="smollm2-135m", help="registered name or .gguf path: vocabulary, launched server")
    a("--served-model-name", default=None, help="request model field (default: the basename of --model)")
    a("--tokenizer", default=None, help="model whose vocabulary makes the prompts (default: --model)")
    a("--dataset-name", choices=("random", "shared-prefix"), default="random")
    a("--num-prompts", type=int, default=100)
    a("--random-input-len", type=int, default=1024, help="prompt length (shared-prefix: the suffix)")
    a("--random-output-len", type=int, default=128)
    a("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    a("--random-prefix-len", type=int, default=0, help="random: one prefix common to all prompts")
    a("--prefix-len", type=int, default=256, help="shared-prefix: tokens per shared prefix")
    a("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    a("--seed", type=int, default=0)
    a("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    a("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    a("--max-concurrency", type=int, default=None)
    a("--num-warmups", type=int, default=0)
    a("--ignore-eos", action="store_true")
    a("--temperature", type=float, default=0.0)
    for flag, kind in (("--top-k", int), ("--top-p", float), ("--min-p", float), ("--repetition-penalty", float)):
        a(flag, type=kind, default=None)
    a("--percentile-metrics", default="ttft,tpot,itl,e2el")
    a("--metric-percentiles", default="50,99")
    a("--save-result", action="store_true")
    a("--result-dir", default=".")
    a("--result-filename", default=None)
    a("--sweep-concurrency", default=None, help="comma-separated max concurrencies, e.g. 1,4,16")
    a("--plot", default=None, help="PNG of the sweep (default with a sweep and --save-result: beside the JSON)")
    a("--compare-offline", action="store_true", help="served vs offline throughput at saturation")
    a("--repeats", type=int, default=1, help="--compare-offline repetitions (medians reported)")
    a("--max-num-seqs", type=int, default=16)
    a("--max-num-batched-tokens", type=int, default=512)
    a("--dtype", default=None)
    a("--max-overhead", type=float, default=0.15, help="--compare-offline: acceptable 1 - served/offline")
    a("--server-timeout", type=float, default=900.0, help="s to wait for a launched server's /health")
    args = ap.parse_args(argv)
    args.percentile_metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := sorted(set(args.percentile_metrics) - set(METRICS)):
        ap.error(f"unknown --percentile-metrics {unknown}; choose from {sorted(METRICS)}")
    args.metric_percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    if args.sweep_concurrency:
        args.sweep_concurrency = [int(c) for c in args.sweep_concurrency.split(",")]
    return args


def workload_builder(args):
    """variant -> the run's prompts (see random_dataset)."""
    vocab = load_vocab(args.tokenizer or args.model)
    if args.dataset_name == "shared-prefix":
        return lambda v: shared_prefix_dataset(vocab, args.num_prompts, args.num_prefixes, args.prefix_len,
                                               args.random_input_len, args.random_output_len, args.random_range_ratio,
                                               args.seed, v)
    return lambda v: random_dataset(vocab, args.num_prompts, args.random_input_len, args.random_output_len,
                                    args.random_range_ratio, args.random_prefix_len, args.seed, v)


def serve_runs(args, base: str, workload, model_name: str, first_variant: int = 1) -> list[dict]:
    """The workload against the server at `base`, once per swept max concurrency (or once), each
    run on its own variant; `workload(0)` gives the warm-ups."""
    pcts, sel = args.metric_percentiles, args.percentile_metrics
    sampling = {"temperature": args.temperature}
    sampling |= {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p), ("min_p", args.min_p),
                                   ("repetition_penalty", args.repetition_penalty)) if v is not None}
    runs, warm = [], workload(0)
    warmups = [warm[i % len(warm)] for i in range(args.num_warmups)]
    for i, conc in enumerate(args.sweep_concurrency or [args.max_concurrency]):
        results, duration = asyncio.run(run_workload(
            base.rstrip("/") + args.endpoint, model_name, workload(first_variant + i), request_rate=args.request_rate,
            burstiness=args.burstiness, max_concurrency=conc, warmups=warmups, ignore_eos=args.ignore_eos,
            sampling=sampling, seed=args.seed, api_key=args.api_key))
        m = compute_metrics(results, duration, pcts, sel)
        print(format_table(m, pcts, sel, conc), flush=True)
        if m["failed"]:
            print(f"first error: {next(e for e in m['errors'] if e)}", flush=True)
        runs.append({"max_concurrency": conc, **m})
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    workload = workload_builder(args)
    model_name = args.served_model_name or os.path.basename(args.model)  # the server's default name
    pcts, sel = args.metric_percentiles, args.percentile_metrics
    rate = "inf" if math.isinf(args.request_rate) else args.request_rate
    result = {"date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "jaxinfer", "model_id": model_name,
              "dataset_name": args.dataset_name, "num_prompts": args.num_prompts, "request_rate": rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "seed": args.seed}
    if args.compare_offline:
        result |= {"mode": "compare-offline", "request_rate": "inf", "max_concurrency": None, "dtype": args.dtype,
                   "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
        args.ignore_eos = True  # as offline: every request makes exactly its output length
        sweep = lambda base: serve_runs(args, base, workload, model_name, args.repeats + 1)  # noqa: E731
        result |= compare_offline(args, workload, model_name, then=sweep if args.sweep_concurrency else None)
        print(format_table(result["served"][-1], pcts, sel))
        print("{:=^50}".format(" Served vs offline (saturation) "))
        print(f"{'Offline output throughput (tok/s):':<40} {result['offline_output_throughput']:<10.2f}")
        print(f"{'Served output throughput (tok/s):':<40} {result['served_output_throughput']:<10.2f}")
        print(f"{'HTTP overhead (1 - served/offline):':<40} {100 * result['http_overhead']:.1f}% "
              f"({'within' if result['within_max_overhead'] else 'OVER'} {100 * args.max_overhead:.0f}%)")
        print("=" * 50)
    else:
        runs = serve_runs(args, args.base_url or f"http://{args.host}:{args.port or 8000}", workload, model_name)
        result |= {"mode": "sweep", "max_concurrency": None, "sweep": runs} if args.sweep_concurrency else runs[0]
    name = os.path.basename(model_name)
    stem = args.result_filename or f"jaxinfer-{args.dataset_name}-{rate}qps-{name}-{result['date']}.json"
    path = os.path.join(args.result_dir, stem)
    if args.save_result:
        os.makedirs(args.result_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {path}")
    plot = args.plot or (os.path.splitext(path)[0] + ".png" if args.save_result and args.sweep_concurrency else None)
    if plot and "sweep" in result:
        plot_sweep(result["sweep"], plot, pcts)
        print(f"plot written to {plot}")
    elif plot:
        print("nothing plotted: --plot draws a --sweep-concurrency run")
    return result


if __name__ == "__main__":
    main()
