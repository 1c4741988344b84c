"""Engine test helpers shared by the test files: an engine from a loaded model with test-sized
settings, a run to completion with aborts at chosen steps, the no-leak check, random prompts."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from jaxinfer.engine import LLMEngine
from jaxinfer.engine_config import EngineConfig

# Small enough for a tiny model on CPU; chunked prefill past 16 tokens, 4-token pages.
TEST_ENGINE_SETTINGS = dict(max_num_seqs=8, max_num_batched_tokens=16, page_size=4, num_pages=64,
                            compilation_cache_dir="")


def make_engine(model, **overrides) -> LLMEngine:
    """An LLMEngine over `model` (a `loader.LoadedModel`) with TEST_ENGINE_SETTINGS, `overrides` on top."""
    settings = {**TEST_ENGINE_SETTINGS, **overrides}
    return LLMEngine(model.config, model.graphdef, model.params, model.tokenizer, EngineConfig.of(**settings))


@contextlib.contextmanager
def compile_events():
    """Yields a list that collects the JAX compile events (tracing, backend compiles) of the block."""
    events, listening = [], [True]

    def listener(event, duration, **kwargs):
        if listening[0] and event in ("/jax/core/compile/backend_compile_duration",
                                      "/jax/core/compile/jaxpr_trace_duration"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)  # (JAX has no unregister: muted after)
    try:
        yield events
    finally:
        listening[0] = False


def run(engine: LLMEngine, requests: dict, abort_after: dict | None = None) -> dict:
    """Adds every {id: (ids, params)} request, steps to the end (aborting {id: step} on the way);
    returns the final RequestOutputs by id."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    finished, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
        for rid, at in (abort_after or {}).items():
            if at == step and (out := engine.abort(rid)) is not None:
                finished[rid] = out
    return finished


def assert_no_pages_held(engine: LLMEngine) -> None:
    """Nothing running or waiting, every page free, no request left in the scheduler or the pool."""
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert all(b.ref_cnt == 0 for b in engine.kv_manager.pool.blocks)
    assert not engine.kv_manager.req_to_blocks and not engine.scheduler.requests


def random_prompts(cfg, lengths, seed=0) -> list[list[int]]:
    """Prompts of random token ids in [3, vocab) with the given lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]


def generate(model, prompts, params, spec=None, abort_after=None, **settings):
    """Runs {str(i): prompt} with params(i) through an engine (speculative_config=spec) ->
    ({id: output token ids}, the engine)."""
    engine = make_engine(model, **{**dict(max_num_seqs=4, page_size=16, num_pages=160), **settings},
                         speculative_config=spec)
    outs = run(engine, {str(i): (p, params(i)) for i, p in enumerate(prompts)}, abort_after)
    return {rid: o.outputs[0].token_ids for rid, o in outs.items()}, engine
