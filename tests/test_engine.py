"""The engine on a tiny random model: batch invariance against the reference generator run alone,
preemption, prefix caching, n > 1, logprobs, penalties, aborts without leaks, and no compiles
after warm-up."""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest

from jaxinfer.engine import EngineConfig
from jaxinfer.errors import EmptyPromptError, InvalidRequestError, PromptTooLongError
from jaxinfer.loader import load_model
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.testing import tiny_gguf
from jaxinfer.testing.engine import (assert_no_pages_held, compile_events, make_engine, random_prompts,  # noqa: F401 (shared)
                                     run)

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path)
    return load_model(str(path), progress=False)


@pytest.fixture(scope="module")
def reference(tiny):
    return ReferenceGenerator(tiny.config, tiny.graphdef, tiny.params)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request):
    """Runs a test with the engine stepping synchronously and with async scheduling."""
    return request.param


# ---- batch invariance, preemption, prefix caching -----------------------------------------------

# 1 token, page - 1, page, page + 1, several pages, longer than the 16-token step budget (chunked)
LENGTHS = [1, 3, 4, 5, 12, 21, 2, 40, 7, 16, 17, 1, 33, 9, 4, 26]


@pytest.mark.parametrize("scan_layers,layer_loop,async_scheduling", [
    (True, "model", False), (False, "model", True), (True, "per_layer", False), (True, "per_layer", True),
    (True, "hybrid", False)])
def test_sixteen_mixed_requests_match_the_reference_alone(tiny, reference, scan_layers, layer_loop, async_scheduling):
    model = tiny if scan_layers else load_model(tiny.path, scan_layers=False, progress=False)
    prompts = random_prompts(tiny.config, LENGTHS)
    engine = make_engine(model, layer_loop=layer_loop, async_scheduling=async_scheduling)
    outs = run(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        assert outs[str(i)].outputs[0].token_ids == reference.generate([p], [GREEDY])[0].token_ids, i
    assert engine.stats()["steps"] > max(LENGTHS) // 16  # chunked prefill happened
    assert_no_pages_held(engine)


def test_preemption_under_a_small_pool_keeps_the_tokens(async_scheduling, tiny, reference):
    prompts = random_prompts(tiny.config, (9, 10, 11, 7), seed=1)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = make_engine(tiny, async_scheduling=async_scheduling, num_pages=12)
    outs = run(engine, {str(i): (p, params) for i, p in enumerate(prompts)})
    assert engine.stats()["num_preemptions"] > 0
    for i, p in enumerate(prompts):
        assert outs[str(i)].outputs[0].token_ids == reference.generate([p], [params])[0].token_ids
    assert_no_pages_held(engine)


def test_kv_pages_peak_is_the_most_pages_held_after_a_step(async_scheduling, tiny):
    prompts = random_prompts(tiny.config, (9, 10, 11, 7), seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = make_engine(tiny, async_scheduling=async_scheduling, num_pages=32)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    held = [0]
    while engine.has_unfinished_requests():
        engine.step()
        held.append(engine.stats()["kv_pages_used"])
    s = engine.stats()
    assert s["kv_pages_peak"] == max(held) > 0 and s["kv_pages_used"] == 0
    engine.reset_kv_pages_peak()
    assert engine.stats()["kv_pages_peak"] == 0


def test_prefix_cache_computes_only_the_new_tokens(async_scheduling, tiny):
    shared = random_prompts(tiny.config, [12], seed=2)[0]  # 3 full pages of 4
    a, b = shared + [7, 8], shared + [9, 10, 11]
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    run(engine, {"a": (a, GREEDY)})
    before = engine.stats()
    out_b = run(engine, {"b": (b, GREEDY)})["b"]
    after = engine.stats()
    # b computes its 3 new prompt tokens plus one per generated token after the first
    assert after["computed_tokens"] - before["computed_tokens"] == len(b) - 12 + GREEDY.max_tokens - 1
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 12
    assert out_b.metrics.num_cached_tokens == 12
    uncached = run(make_engine(tiny, async_scheduling=async_scheduling, enable_prefix_caching=False),
                   {"b": (b, GREEDY)})["b"]
    assert out_b.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_n_samples_share_the_prompt_pages_and_match_single_requests(async_scheduling, tiny):
    prompt = random_prompts(tiny.config, [13], seed=3)[0]
    params = SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=11, ignore_eos=True)
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    out = run(engine, {"x": (prompt, params)})["x"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * 12  # samples 1, 2 reuse sample 0's 3 pages
    for i, completion in enumerate(out.outputs):
        single = SamplingParams(max_tokens=5, temperature=1.0, seed=11 + i, ignore_eos=True)
        alone = run(make_engine(tiny, async_scheduling=async_scheduling), {"y": (prompt, single)})["y"]
        assert completion.token_ids == alone.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


# ---- sampling -----------------------------------------------------------------------------------

def test_seeded_sampling_is_independent_of_the_batch(async_scheduling, tiny):
    prompt = random_prompts(tiny.config, [6], seed=4)[0]
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=5,
                            repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True)
    alone = run(make_engine(tiny, async_scheduling=async_scheduling), {"x": (prompt, params)})["x"].outputs[0].token_ids
    others = {f"o{i}": (p, SamplingParams(max_tokens=4 + i, temperature=float(i % 2), seed=i, ignore_eos=True))
              for i, p in enumerate(random_prompts(tiny.config, [3, 20, 1, 9, 30], seed=5))}
    together = run(make_engine(tiny, async_scheduling=async_scheduling),
                   {**others, "x": (prompt, params)})["x"].outputs[0].token_ids
    assert together == alone and len(alone) == 8


def numpy_penalized(logits, prompt, output, rep, presence, frequency):
    """vLLM's penalties written out in numpy: repetition on prompt and output tokens (divide a
    positive logit, multiply a negative one), presence and frequency on output tokens."""
    logits = np.array(logits, np.float64)
    seen = sorted(set(prompt) | set(output))
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / rep, logits[seen] * rep)
    counts = np.bincount(output, minlength=logits.shape[0]).astype(np.float64)
    return logits - frequency * counts - presence * (counts > 0)


def test_penalties_follow_the_vllm_definition_step_by_step(async_scheduling, tiny, reference):
    prompt = random_prompts(tiny.config, [5], seed=6)[0]
    rep, presence, frequency = 1.5, 0.7, 0.9
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=rep, presence_penalty=presence,
                            frequency_penalty=frequency, ignore_eos=True)
    out = run(make_engine(tiny, async_scheduling=async_scheduling), {"x": (prompt, params)})["x"].outputs[0].token_ids
    logits = reference.logits(prompt + out)
    for step, token in enumerate(out):
        row = numpy_penalized(logits[len(prompt) - 1 + step], prompt, out[:step], rep, presence, frequency)
        assert token == int(np.argmax(row)), step
    plain = reference.generate([prompt], [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)])
    huge_params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1e6)
    huge = run(make_engine(tiny, async_scheduling=async_scheduling), {"x": (prompt, huge_params)})["x"]
    huge = huge.outputs[0].token_ids
    assert len(set(huge) | set(prompt)) == len(huge) + len(set(prompt))  # never repeats a seen token
    assert plain[0].token_ids  # the unpenalized run for comparison exists


def test_min_tokens_suppresses_stop_tokens(async_scheduling, tiny, reference):
    prompt = random_prompts(tiny.config, [4], seed=7)[0]
    first = reference.generate([prompt], [GREEDY])[0].token_ids[0]
    stop = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop_token_ids=[first])
    stopped = run(make_engine(tiny, async_scheduling=async_scheduling), {"x": (prompt, stop)})["x"].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    hold = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop_token_ids=[first], min_tokens=3)
    held = run(make_engine(tiny, async_scheduling=async_scheduling), {"x": (prompt, hold)})["x"]
    ids = held.outputs[0].token_ids
    assert len(ids) >= 3 and first not in ids[:3]


def test_logprobs_match_the_reference_logits(async_scheduling, tiny, reference):
    prompt = random_prompts(tiny.config, [7], seed=8)[0]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = run(make_engine(tiny, async_scheduling=async_scheduling), {"x": (prompt, params)})["x"]
    ids = out.outputs[0].token_ids
    logits = reference.logits(prompt + ids)  # [T, V]
    lp = jax.nn.log_softmax(logits, axis=-1)
    for step, (token, entry) in enumerate(zip(ids, out.outputs[0].logprobs)):
        row = np.asarray(lp[len(prompt) - 1 + step])
        assert entry[token].logprob == pytest.approx(row[token], abs=1e-4)
        top3 = list(np.argsort(-row)[:3])
        assert [i for i, v in sorted(entry.items(), key=lambda kv: kv[1].rank or 99)][:3] == top3
        assert entry[top3[0]].rank == 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(float(lp[pos - 1, prompt[pos]]), abs=1e-4)


# ---- aborts and leaks ---------------------------------------------------------------------------

def test_abort_mid_prefill_and_mid_decode_frees_everything(async_scheduling, tiny):
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    long_prompt, short = random_prompts(tiny.config, [40, 3], seed=9)
    engine.add_request("long", long_prompt, GREEDY)
    engine.add_request("short", short, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()  # "long" has computed part of its prompt only (budget 16)
    assert 0 < engine.scheduler.requests["long"].num_computed_tokens < 40
    out = engine.abort("long")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.step()
    engine.step()
    assert engine.abort("short").outputs[0].finish_reason == "abort"
    assert engine.abort("short") is None and engine.abort("nope") is None
    assert_no_pages_held(engine)


def test_two_hundred_requests_with_random_aborts_leak_no_pages(async_scheduling, tiny):
    rng = random.Random(0)
    engine = make_engine(tiny, async_scheduling=async_scheduling, num_pages=20)
    requests, abort_after = {}, {}
    for i in range(200):
        n = rng.choice([1, 2, 3, 4, 5, 8, 15, 16, 17, 30])
        ids = [rng.randrange(3, tiny.config.vocab_size) for _ in range(n)]
        if i % 5 == 0:  # shared prefixes exercise the prefix cache under aborts
            ids = [5] * 8 + ids
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0.0, 1.0]), seed=i,
                                n=rng.choice([1, 1, 1, 2]), ignore_eos=True)
        requests[f"r{i}"] = (ids, params)
        if rng.random() < 0.3:
            abort_after[f"r{i}"] = rng.randint(1, 60)
    outs = run(engine, requests, abort_after)
    assert len(outs) == 200
    aborted = [o for o in outs.values() if any(c.finish_reason == "abort" for c in o.outputs)]
    assert aborted and len(aborted) < 200
    assert engine.stats()["num_preemptions"] > 0
    assert_no_pages_held(engine)
    assert engine.stats()["kv_pages_cached"] > 0  # released pages stay cached until evicted


def test_bad_requests_raise_typed_errors_and_queue_nothing(tiny):
    engine = make_engine(tiny, max_model_len=64)
    with pytest.raises(EmptyPromptError):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(PromptTooLongError, match="at most 63"):
        engine.add_request("a", [5] * 64, GREEDY)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("a", [5, 10**6], GREEDY)
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        engine.add_request("a", [5], {"max_tokens": 3})
    engine.add_request("a", [5], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [6], GREEDY)
    assert engine.num_unfinished_requests == 1
    run(engine, {})
    assert_no_pages_held(engine)


def test_too_small_memory_budget_is_a_clear_error(tiny):
    """An explicit context the budget cannot hold is refused; one page is no pool at all."""
    page_bytes = 2 * tiny.config.num_layers * 4 * tiny.config.num_kv_heads * tiny.config.head_dim * 4
    with pytest.raises(InvalidRequestError, match="raise kv_cache_memory or lower max_model_len"):
        make_engine(tiny, num_pages=None, kv_cache_memory=10 * page_bytes, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="raise kv_cache_memory or lower max_model_len"):
        make_engine(tiny, num_pages=None, kv_cache_memory=page_bytes)


def test_default_context_shrinks_to_the_budget_with_a_warning(tiny, caplog):
    """No max_model_len asked for: the engine uses what the budget holds (9 usable pages of 4 tokens
    here) instead of refusing, says so, and refuses longer prompts with the usual typed error."""
    page_bytes = 2 * tiny.config.num_layers * 4 * tiny.config.num_kv_heads * tiny.config.head_dim * 4
    assert tiny.config.max_position_embeddings > 36
    with caplog.at_level("WARNING", logger="jaxinfer.engine"):
        engine = make_engine(tiny, num_pages=None, kv_cache_memory=10 * page_bytes)
    assert engine.max_model_len == 36 and "max_model_len set to 36" in caplog.text
    with pytest.raises(InvalidRequestError, match="context window is 36"):
        engine.add_request("long", list(range(1, 40)), SamplingParams(max_tokens=1))


# ---- compilation --------------------------------------------------------------------------------

def test_nothing_compiles_after_warmup(async_scheduling, tiny):
    engine = make_engine(tiny, async_scheduling=async_scheduling, num_pages=48)
    engine.warmup()
    with compile_events() as events:
        rng = random.Random(1)
        requests = {}
        for i in range(40):
            ids = [rng.randrange(3, tiny.config.vocab_size) for _ in range(rng.randint(1, 60))]
            max_tokens = rng.randint(1, 12)
            params = SamplingParams(
                max_tokens=max_tokens, temperature=rng.choice([0.0, 0.7, 1.2]), top_k=rng.choice([0, 5]),
                top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.1]), seed=i, n=rng.choice([1, 2]),
                repetition_penalty=rng.choice([1.0, 1.1]), frequency_penalty=rng.choice([0.0, 0.4]),
                min_tokens=min(rng.choice([0, 2]), max_tokens), logprobs=rng.choice([None, 0, 4]),
                prompt_logprobs=rng.choice([None, None, 2]), ignore_eos=rng.random() < 0.5,
                structured_outputs=rng.choice([None, None, dict(regex="[a-z]{2,9}"), dict(choice=["yes", "no"])]))
            requests[f"r{i}"] = (ids, params)
        outs = run(engine, requests, {f"r{i}": rng.randint(1, 30) for i in range(0, 40, 7)})
    assert len(outs) == 40
    assert events == [], f"{len(events)} compile events after warm-up"


def test_kv_budget_from_bytes_or_a_fraction_of_free_device_memory():
    from jaxinfer.engine_config import DEFAULT_CPU_KV_CACHE_BYTES, kv_cache_budget

    class FakeAccelerator:
        def memory_stats(self):
            return {"bytes_limit": 80 << 30, "bytes_in_use": 20 << 30}

    class FakeCpu:
        def memory_stats(self):
            return None

    assert kv_cache_budget(EngineConfig.of(kv_cache_memory=123456), FakeAccelerator()) == 123456
    assert kv_cache_budget(EngineConfig.of(memory_fraction=0.5), FakeAccelerator()) == 30 << 30
    assert kv_cache_budget(EngineConfig(), FakeCpu()) == DEFAULT_CPU_KV_CACHE_BYTES


def test_page_count_follows_the_budget_and_is_logged(tiny, caplog):
    from jaxinfer.paged_attention import PagedKVCache

    cfg = tiny.config
    page_bytes = PagedKVCache.bytes_per_page(num_layers=cfg.num_layers, page_size=4, num_kv_heads=cfg.num_kv_heads,
                                             head_dim=cfg.head_dim, dtype=cfg.dtype)
    with caplog.at_level("INFO", logger="jaxinfer.engine"):
        engine = make_engine(tiny, num_pages=None, kv_cache_memory=200 * page_bytes + 5)
    assert engine.num_pages == 200 and engine.runner.kv_cache.k.shape[1] == 200
    assert "KV cache: 199 pages x 4 tokens" in caplog.text


def fail_second_step(engine, message: str) -> None:
    """Makes the engine's second step raise RuntimeError(message) as it is dispatched (a device error)."""
    real_submit, calls = engine.runner.submit, []

    def flaky(out):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(message)
        return real_submit(out)

    engine.runner.submit = flaky


def test_async_engine_survives_a_failing_step(async_scheduling, tiny):
    from jaxinfer.async_engine import AsyncEngine

    engine = make_engine(tiny, async_scheduling=async_scheduling)
    fail_second_step(engine, "device fell over")
    async_engine = AsyncEngine(engine)
    try:
        doomed = async_engine.submit([5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        with pytest.raises(RuntimeError, match="device fell over"):
            doomed.result(timeout=60)
        fine = async_engine.submit([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(fine.result(timeout=60).outputs[0].token_ids) == 3
        assert_no_pages_held(engine)
    finally:
        async_engine.shutdown()


def test_async_engine_stats_are_published_by_the_engine_thread(tiny):
    """Callers (the /metrics scrape) read a snapshot the engine thread took between steps, never the
    scheduler or page pool mid-step; a finished request is in the snapshot before its caller hears."""
    import threading

    from jaxinfer.async_engine import AsyncEngine

    engine = make_engine(tiny)
    real_stats, readers = engine.stats, set()

    def stats():
        readers.add(threading.current_thread().name)
        return real_stats()

    engine.stats = stats
    async_engine = AsyncEngine(engine)
    try:
        assert async_engine.stats()["finished"] == 0
        readers.clear()
        for n in range(1, 4):
            out = async_engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0.0)).result(timeout=60)
            s = async_engine.stats()
            assert out.finished and s["finished"] == n and s["prompt_tokens"] == 4 * n
            assert s["num_running"] == 0 and s["kv_pages_used"] == 0
        assert readers == {"jaxinfer-engine"}
    finally:
        async_engine.shutdown()


def test_a_failed_step_aborts_the_requests_it_carried_and_the_rest_go_on(async_scheduling, tiny, reference):
    """Its requests' tokens were counted when scheduled and never come back: they end with "abort"
    (freeing their pages), a request the failed step did not carry finishes as if nothing happened."""
    engine = make_engine(tiny, async_scheduling=async_scheduling, max_num_seqs=1)
    prompts = random_prompts(tiny.config, [5, 6], seed=11)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)  # waits: one sequence at a time
    fail_second_step(engine, "transient device error")
    engine.step()
    with pytest.raises(RuntimeError, match="transient"):
        engine.step()
    assert "a" not in engine.scheduler.requests
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["b"].outputs[0].token_ids == reference.generate([prompts[1]], [GREEDY])[0].token_ids
    assert_no_pages_held(engine)


def test_a_processed_prompt_is_trusted_only_from_the_engines_own_processor(tiny):
    from jaxinfer.input_processor import InputProcessor, ProcessedPrompt

    engine = make_engine(tiny, max_model_len=32)
    with pytest.raises(PromptTooLongError):  # checked by a processor with a longer context: checked again
        engine.add_request("x", InputProcessor(tiny.config.vocab_size, 4096).process([5] * 40, GREEDY))
    with pytest.raises(PromptTooLongError):  # built by hand: checked
        engine.add_request("y", ProcessedPrompt(tuple([5] * 40), GREEDY))
    with pytest.raises(InvalidRequestError, match="its own sampling params"):
        engine.add_request("z", engine.input_processor.process([5, 6], GREEDY), SamplingParams(max_tokens=2))
    assert not engine.scheduler.requests
