"""The engine on the real model (SmolLM2-135M, float32): batch invariance against the reference
generator run alone, streaming with stop strings, and the threaded engine."""

from __future__ import annotations

import threading

import pytest

from jaxinfer.async_engine import AsyncEngine, EngineDeadError
from jaxinfer.engine import EngineConfig, LLMEngine
from jaxinfer.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompts(tokenizer, page_size, budget):
    """16 prompts: 1 token, page - 1, page, page + 1, several pages, longer than the step budget."""
    text = ("The history of the city begins with a small settlement on the river, where traders met to "
            "exchange grain, salt and cloth. Over the centuries it grew into a busy port. ") * 8
    ids = tokenizer.encode(text)
    lengths = [1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5, budget + 37, 2, 7, 23, 40,
               page_size * 2, 64, 90, 5, budget - 1, 11]
    assert len(ids) > max(lengths)
    return [ids[i:i + n] for i, n in enumerate(lengths)]


def test_sixteen_mixed_requests_match_the_reference_alone(smollm2, smollm2_reference):
    engine = smollm2.engine
    prompts = _prompts(smollm2.get_tokenizer(), engine.page_size, engine.engine_config.max_num_batched_tokens)
    steps_before = engine.stats()["steps"]
    outs = smollm2.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert engine.stats()["steps"] - steps_before < 16 * GREEDY.max_tokens  # they really ran together
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == smollm2_reference.generate([p], [GREEDY])[0].token_ids, len(p)


def test_streamed_text_grows_and_never_shows_the_stop_string(smollm2):
    base = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    stop = " 7,"
    assert stop in base.text
    texts = [o.outputs[0].text for o in smollm2.stream("1, 2, 3, 4,", SamplingParams(max_tokens=12, temperature=0,
                                                                                       stop=[stop]))]
    final = texts[-1]
    assert final == base.text[:base.text.index(stop)]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)
    assert all(stop not in t and final.startswith(t) for t in texts)


def test_threaded_engine_serves_concurrent_submitters_and_cancels(smollm2):
    cfg = smollm2.engine
    engine = LLMEngine(smollm2.config, cfg.runner.graphdef, cfg.runner.params, smollm2.get_tokenizer(),
                       EngineConfig.of(max_num_seqs=4, max_num_batched_tokens=64, compilation_cache_dir=""))
    async_engine = AsyncEngine(engine)
    tok = smollm2.get_tokenizer()
    prompts = ["The capital of France is", "Water boils at", "One, two, three,", "The sky is"]
    want = {p: o.outputs[0].token_ids for p, o in zip(prompts, smollm2.generate(prompts, GREEDY))}
    got, errors = {}, []

    def client(p):
        try:
            got[p] = async_engine.submit(tok.encode(p), GREEDY, prompt=p).result(timeout=300).outputs[0].token_ids
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    endless = async_engine.submit(tok.encode("Tell me a long story."),
                                  SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    for i, out in enumerate(endless):
        if i == 2:
            endless.cancel()
        if out.finished:
            break
    assert out.outputs[0].finish_reason == "abort"
    for t in threads:
        t.join()
    assert not errors and got == want
    async_engine.shutdown(drain_timeout=5)
    assert not async_engine.is_running
    assert engine.stats()["kv_pages_used"] == 0
    with pytest.raises(EngineDeadError):
        async_engine.submit([1, 2], GREEDY)
