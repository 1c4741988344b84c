"""Engine core v2: the step is schedule -> execute -> update -> process; compiled steps are shared
between engines; the runner sees only SchedulerOutputs; streaming outputs are deltas (O(n));
jaxinfer's imports have no cycle."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import statistics

import jax
import pytest

from jaxinfer.engine import EngineConfig, LLMEngine
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing import tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path, max_position_embeddings=4096)
    return load_model(str(path), progress=False)


def make_engine(model, **overrides) -> LLMEngine:
    return testing_engine.make_engine(model, **{**dict(max_num_seqs=4, page_size=16, num_pages=160), **overrides})


def test_step_is_schedule_execute_update_process():
    source = inspect.getsource(LLMEngine.step)
    calls = re.findall(r"\.(schedule|execute|update|process)\(", source)
    assert calls == ["schedule", "execute", "update", "process"]
    body = [line for line in source.splitlines()[1:] if line.strip() and not line.strip().startswith(('"', "#"))]
    assert len(body) <= 12, body


def test_runner_sees_only_the_scheduler_output():
    from jaxinfer.runner import Runner

    assert list(inspect.signature(Runner.execute).parameters) == ["self", "out"]


def _compile_events(fn) -> int:
    events = []
    listening = [True]

    def listener(event, duration, **kwargs):
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        listening[0] = False
    return len(events)


@pytest.mark.parametrize("layer_loop", ["per_layer", "model", "hybrid"])
def test_two_engines_of_the_same_shapes_compile_each_graph_once(tiny, layer_loop):
    # A geometry no other test uses, so the first engine really compiles.
    shapes = dict(num_pages={"model": 37, "per_layer": 39, "hybrid": 41}[layer_loop], page_size=8, max_num_seqs=2,
                  max_num_batched_tokens=32, max_model_len=256, layer_loop=layer_loop)
    first = make_engine(tiny, **shapes)
    assert _compile_events(first.warmup) > 0  # (graphs of shapes other tests used are shared already)

    def second_engine():
        engine = make_engine(tiny, **shapes)
        engine.warmup()
        out = engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
        return out

    assert _compile_events(second_engine) == 0


def test_runner_forgets_finished_requests(tiny):
    engine = make_engine(tiny)
    for i in range(3):
        engine.add_request(str(i), [4 + i, 5, 6], SamplingParams(max_tokens=2 + i, temperature=0.0, n=2))
    engine.add_request("stopped", [9, 9], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.abort("stopped")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # an idle step delivers the last finished ids
    assert engine.runner.requests == {}


def _output_bytes(out) -> int:
    """What one output copies: its texts, token ids and logprobs (the prompt list is shared)."""
    return sum(len(c.text.encode()) + 4 * len(c.token_ids) + len(c.logprobs or ()) for c in out.outputs)


def test_streaming_a_long_output_copies_a_constant_amount_per_step(tiny):
    engine = make_engine(tiny, max_model_len=2100)
    prompt = [5, 6, 7, 8]
    n = 2000

    def stream(kind):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, output_kind=kind)
        engine.add_request(kind.value, prompt, params)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        return outs

    deltas = stream(RequestOutputKind.DELTA)
    per_step = [_output_bytes(o) for o in deltas]
    assert len(deltas) == n and deltas[-1].finished
    # Bounded by one token's worth, the same at the end as at the start (not growing with the length).
    assert max(per_step) <= 64
    assert statistics.mean(per_step[-200:]) <= 2 * statistics.mean(per_step[:200])
    assert all(o.prompt_token_ids is deltas[0].prompt_token_ids for o in deltas)  # not copied per step
    assert sum(len(o.outputs[0].token_ids) for o in deltas) == n

    cumulative = stream(RequestOutputKind.CUMULATIVE)  # the measure sees growth where there is some
    assert _output_bytes(cumulative[-1]) > 50 * max(per_step)
    # The deltas add up to the cumulative output (same greedy request).
    assert "".join(o.outputs[0].text for o in deltas) == cumulative[-1].outputs[0].text
    assert [t for o in deltas for t in o.outputs[0].token_ids] == cumulative[-1].outputs[0].token_ids


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_delta_outputs_of_n_samples_with_stop_strings_and_logprobs_add_up(tiny, async_scheduling):
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    common = dict(n=3, max_tokens=12, temperature=1.0, seed=3, logprobs=2, stop=["a", "b"])
    results = {}
    for kind in (RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE):
        engine.add_request(kind.value, [4, 5, 6], SamplingParams(**common, output_kind=kind))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        results[kind] = outs
    final = results[RequestOutputKind.CUMULATIVE][-1]
    stopped = [c for c in final.outputs if isinstance(c.stop_reason, str)]
    assert stopped, "a stop string ended some sample"
    for c in stopped:  # nothing after the stop string reaches the caller (async: the core ran one step more)
        assert c.finish_reason == "stop" and c.stop_reason not in c.text
    if async_scheduling:  # the same samples as stepping synchronously
        sync = make_engine(tiny, async_scheduling=False)
        sync.add_request("s", [4, 5, 6], SamplingParams(**common, output_kind=RequestOutputKind.FINAL_ONLY))
        outs = []
        while sync.has_unfinished_requests():
            outs += sync.step()
        assert [(c.text, c.token_ids, c.finish_reason) for c in outs[-1].outputs] == [
            (c.text, c.token_ids, c.finish_reason) for c in final.outputs]
    deltas = results[RequestOutputKind.DELTA]
    assert deltas[-1].finished and len(deltas[-1].outputs) == 3  # the last output lists every sample
    for c in final.outputs:
        parts = [d for o in deltas for d in o.outputs if d.index == c.index]
        assert "".join(d.text for d in parts) == c.text
        assert [t for d in parts for t in d.token_ids] == c.token_ids
        assert [lp for d in parts for lp in d.logprobs] == c.logprobs
        assert parts[-1].finish_reason == c.finish_reason and parts[-1].stop_reason == c.stop_reason


def _module_imports(path: str, package_roots: set[str]) -> set[str]:
    """Modules of the project a file imports at module level (not inside functions)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in package_roots}
    return found


def test_the_project_has_no_import_cycle():
    roots = {"jaxinfer", "pallas_kernels", "sharding", "checkpoints"}
    modules = {}
    for root in roots:
        for dirpath, _, files in os.walk(os.path.join(ROOT, root)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    modules[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    graph = {m: {i for i in _module_imports(p, roots) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of jobs: leave those edges out.
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in graph[m]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "jaxinfer.runner.runner" in graph and "jaxinfer.data_parallel" in graph


def test_no_module_of_the_runtime_is_over_about_350_lines():
    """Modules that each do one job (issue 16): jaxinfer/ and server.py stay near 350 lines each
    (a little slack for a docstring; past it, split the module by job)."""
    paths = [os.path.join(ROOT, "server.py")]
    for dirpath, _, files in os.walk(os.path.join(ROOT, "jaxinfer")):
        paths += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    sizes = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            sizes[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
    assert len(sizes) > 50
    assert {p: n for p, n in sizes.items() if n > 360} == {}


def test_configs_and_llm_arguments_do_not_start_a_jax_backend():
    """Everything up to loading the model runs before JAX picks a backend (a multi-host run must
    call jax.distributed.initialize first)."""
    import subprocess
    import sys

    code = """
import jaxinfer.llm as llm_module
from jax._src import xla_bridge
from jaxinfer.engine import EngineConfig
from jaxinfer.engine_config import BucketConfig, CacheConfig, CompileConfig, SchedulingConfig
from jaxinfer.errors import InvalidRequestError
from jaxinfer.runner import RunnerConfig
from jaxinfer.scheduler import SchedulerConfig
from jaxinfer.sampling_params import SamplingParams
from sharding.mesh import ParallelConfig

EngineConfig.of(max_num_seqs=4, attention_backend="pallas", sequence_parallel_size=1, compilation_cache_dir="")
EngineConfig(cache=CacheConfig(page_size=16), scheduling=SchedulingConfig(async_scheduling=True),
             buckets=BucketConfig(q_block=16), parallel=ParallelConfig(), compile=CompileConfig(layer_loop="model"))
RunnerConfig(page_size=16, num_pages=8, max_pages_per_seq=4, attention_backend="auto")
SchedulerConfig(max_num_seqs=2)
ParallelConfig(tensor_parallel_size=2)
SamplingParams(n=2, temperature=0.5)
try:
    EngineConfig.of(attention_backend="nope")
except InvalidRequestError:
    pass

class Loaded(Exception):
    pass

def stop_at_load(*args, **kwargs):
    raise Loaded()

llm_module.load_model = stop_at_load
try:
    llm_module.LLM("smollm2-135m", max_num_seqs=2, kv_cache_memory=1 << 20, compilation_cache_dir="")
except Loaded:
    pass
print("backends:", sorted(xla_bridge._backends))
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backends: []" in proc.stdout, proc.stdout


def test_engine_config_is_composed_of_one_config_per_concern():
    from jaxinfer.engine_config import FLAT_FIELDS, BucketConfig, CacheConfig, CompileConfig, SchedulingConfig
    from jaxinfer.errors import InvalidRequestError
    from sharding.mesh import ParallelConfig

    ec = EngineConfig.of(page_size=8, max_num_seqs=3, q_block=16, tensor_parallel_size=2, layer_loop="model")
    assert ec.cache == CacheConfig(page_size=8) and ec.scheduling == SchedulingConfig(max_num_seqs=3)
    assert ec.buckets == BucketConfig(q_block=16) and ec.parallel == ParallelConfig(tensor_parallel_size=2)
    assert ec.compile == CompileConfig(layer_loop="model")
    assert (ec.page_size, ec.max_num_seqs, ec.tensor_parallel_size) == (8, 3, 2)  # flat reads too
    for part in (ec.cache, ec.scheduling, ec.buckets, ec.parallel, ec.compile):  # frozen, keyword-only
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.__setattr__(dataclasses.fields(part)[0].name, None)
        with pytest.raises(TypeError):
            type(part)(1)
    assert set(FLAT_FIELDS) >= {"num_pages", "max_model_len", "seq_buckets", "data_parallel_size", "attention_backend"}
    with pytest.raises(InvalidRequestError, match="unknown engine settings .'max_seqs'."):
        EngineConfig.of(max_seqs=4)
    with pytest.raises(InvalidRequestError, match="page_size must be positive"):
        EngineConfig.of(page_size=0)
    with pytest.raises(InvalidRequestError, match="multiple of sequence_parallel_size"):
        EngineConfig.of(sequence_parallel_size=4, max_num_batched_tokens=30)  # a check across parts
    with pytest.raises(InvalidRequestError, match="positive integer"):
        EngineConfig.of(data_parallel_size=0)


def test_an_empty_compilation_cache_dir_turns_the_cache_off_after_it_was_on(tmp_path, monkeypatch):
    """The cache on, then off; JAXINFER_COMPILATION_CACHE_MIN_SECS decides which graphs are written
    (0: every one, as the suite sets for its subprocesses; unset: those over 0.5 s, not a tiny one)."""
    import subprocess
    import sys

    from jaxinfer.compilation_cache import set_compilation_cache

    code = """
import os, sys
import jax, jax.numpy as jnp
from jaxinfer.engine import set_compilation_cache

on = set_compilation_cache(sys.argv[1])
jax.jit(lambda x: x * 2 + 1)(jnp.ones(7)).block_until_ready()
written = len(os.listdir(on))
assert set_compilation_cache("") is None
jax.jit(lambda x: x * 3 - 1)(jnp.ones(9)).block_until_ready()
print(written, len(os.listdir(on)))
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    counts = {}
    for min_secs in ("0", None):
        env.pop("JAXINFER_COMPILATION_CACHE_MIN_SECS", None)
        if min_secs is not None:
            env["JAXINFER_COMPILATION_CACHE_MIN_SECS"] = min_secs
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"cache-{min_secs}")], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        counts[min_secs] = tuple(map(int, proc.stdout.split()))
    written, after = counts["0"]
    assert written >= 1 and after == written  # on: the first graph was cached; off: the second was not
    assert counts[None] == (0, 0)  # the default writes no graph that compiles in milliseconds
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("JAXINFER_COMPILATION_CACHE_MIN_SECS", bad)
        with pytest.raises(ValueError, match="JAXINFER_COMPILATION_CACHE_MIN_SECS must be a number of seconds"):
            set_compilation_cache(str(tmp_path / "unused"))


def test_a_request_is_validated_once_at_the_edge(tiny, monkeypatch):
    """The prompt check runs once per request: in `LLM` (the CLI goes through it) and in
    `AsyncEngine.submit` (the server's path; the server's own handler passes a ProcessedPrompt,
    which nothing checks again); the engine trusts what arrives checked. Raw ids given straight
    to `LLMEngine.add_request` are checked there, once."""
    from jaxinfer.async_engine import AsyncEngine, PromptSpec
    from jaxinfer.errors import InvalidRequestError
    from jaxinfer.input_processor import InputProcessor
    from jaxinfer.llm import LLM

    calls = []
    real = InputProcessor.prompt
    monkeypatch.setattr(InputProcessor, "prompt", lambda self, ids, where="prompt": calls.append(1) or real(
        self, ids, where))
    params = SamplingParams(max_tokens=2, temperature=0.0)
    llm = LLM(tiny.path, progress=False, warmup=False, max_num_seqs=4, max_num_batched_tokens=16,
              num_pages=64)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
    assert len(calls) == 1
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [5, 10**7]}], params)
    engine = make_engine(tiny)
    async_engine = AsyncEngine(engine)
    try:
        calls.clear()
        async_engine.submit([5, 6, 7], params).result(timeout=60)
        assert len(calls) == 1
        processed = engine.input_processor.process([5, 6], params)
        calls.clear()
        async_engine.submit_many([PromptSpec(processed, params)]).result(timeout=60)
        assert calls == []
    finally:
        async_engine.shutdown()
    calls.clear()
    make_engine(tiny).add_request("raw", [5, 6], params)
    assert len(calls) == 1


def test_the_hybrid_loop_runs_decode_steps_of_up_to_4_rows_as_one_graph(tiny):
    """layer_loop="hybrid": decode and verify shapes of at most HYBRID_ROWS rows run `forward_step`,
    every other shape (mixed, prefill, larger decodes) one layer at a time."""
    from jaxinfer.runner.buckets import HYBRID_ROWS, one_graph

    runner = make_engine(tiny, layer_loop="hybrid", max_num_seqs=8).runner
    shapes = runner.all_step_shapes()
    one = {s for s in shapes if one_graph("hybrid", s)}
    assert one and all(s.T == s.S <= HYBRID_ROWS and s.q_block == 1 for s in one)
    assert any(s.T == s.S == 8 for s in shapes if s not in one)  # 8-row decodes stay per layer
    assert any(s.T > s.S for s in shapes if s not in one)  # mixed / prefill steps too
    assert all(one_graph("model", s) and not one_graph("per_layer", s) for s in shapes)
