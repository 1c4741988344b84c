"""Tensor, data and sequence parallelism on 8 virtual CPU devices (tests/conftest.py sets the
device count): the engine on (data, seq, model) meshes gives the single-device run's greedy tokens
and prompt logprobs, with parameters and KV cache actually split; head layouts; configuration
errors."""

from __future__ import annotations

import re

import jax
import pytest

from jaxinfer.engine import EngineConfig, LLMEngine
from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.testing.engine import assert_no_pages_held, random_prompts, run
from sharding.heads import head_layout
from sharding.mesh import ParallelConfig, make_mesh

PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=20)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (virtual CPU devices)")


@pytest.mark.parametrize("N, K, M", [(9, 3, 2), (9, 3, 4), (9, 3, 8), (4, 2, 8), (32, 8, 4), (8, 8, 2), (6, 1, 4)])
def test_head_layout_gives_every_shard_whole_groups(N, K, M):
    layout = head_layout(N, K, M)
    Np, Kp = layout.num_heads, layout.num_kv_heads
    assert Np % M == 0 and Kp % M == 0 and Np % Kp == 0
    G, Gp = N // K, Np // Kp
    real = [q for q in layout.q_source if q >= 0]
    assert sorted(real) == list(range(N)), "every query head exactly once"
    assert {k for k in layout.kv_source if k >= 0} == set(range(K))
    for slot, q in enumerate(layout.q_source):
        if q >= 0:  # the slot's KV head (on the same shard) is the head this query reads
            assert layout.kv_source[slot // Gp] == q // G
    if K % M == 0:
        assert layout.is_identity


def _engine(model, tp, **kw):
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=16, page_size=4, num_pages=64, compilation_cache_dir="",
               tensor_parallel_size=tp)
    cfg.update(kw)
    return LLMEngine(model.config, model.graphdef, model.params, model.tokenizer, EngineConfig.of(**cfg),
                     devices=jax.devices()[:tp])


def _assert_same(base, outs, tol=1e-4):
    for a, b in zip(base, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):  # top-20 logprobs per position
            assert pa.keys() == pb.keys() or len(pa.keys() ^ pb.keys()) <= 2  # ties at the 20th may swap
            for t in pa.keys() & pb.keys():
                assert abs(pa[t].logprob - pb[t].logprob) < tol


@pytest.fixture(scope="module")
def tiny():
    import tempfile

    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf

    path = tempfile.mkdtemp() + "/tiny.gguf"
    tiny_gguf(path)
    return load_model(path, progress=False)


@pytest.fixture(scope="module")
def tiny_single(tiny):
    prompts = random_prompts(tiny.config, [1, 3, 4, 5, 12, 21], seed=3)
    outs = run(_engine(tiny, 1), {str(i): (p, PARAMS) for i, p in enumerate(prompts)})
    return prompts, [outs[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_tiny_model_matches_one_device(tiny, tiny_single, tp):
    prompts, base = tiny_single
    engine = _engine(tiny, tp)
    outs = run(engine, {str(i): (p, PARAMS) for i, p in enumerate(prompts)})
    _assert_same(base, [outs[str(i)] for i in range(len(prompts))])
    assert_no_pages_held(engine)
    # The arrays really are split: each device holds 1/tp of the heads, MLP columns and KV heads.
    params, cache = engine.runner.params, engine.runner.kv_cache
    wq = params["layers"]["wq"].get_value()
    assert len(wq.sharding.device_set) == tp
    assert wq.addressable_shards[0].data.shape[2] == engine.config.num_heads // tp
    w_up = params["layers"]["w_up"].get_value()
    assert w_up.addressable_shards[0].data.shape[-1] == tiny.config.intermediate_size // tp
    assert cache.k.addressable_shards[0].data.shape[3] == engine.config.num_kv_heads // tp
    assert cache.k.sharding.spec[3] == "model" and engine.config.num_kv_heads % tp == 0


def _assert_all_pages_free(engine):
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert all(b.ref_cnt == 0 for kv in engine.kv_managers for b in kv.pool.blocks)


@pytest.mark.parametrize("dp, tp", [(2, 1), (2, 4), (8, 1)])
def test_data_parallel_tiny_model_matches_one_device(tiny, dp, tp):
    """Replicas with their own pages and batch slices; more requests than one replica's
    max_num_seqs, so every replica works; an n = 2 sampled request stays reproducible, and so does
    one with a grammar (its mask stacked with the other replicas' rows), and a beam search (its page
    copies made in its replica's slice of the cache)."""
    prompts = random_prompts(tiny.config, [1, 3, 4, 5, 12, 21, 7, 30, 2], seed=3)
    sampled = SamplingParams(n=2, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    constrained = SamplingParams(max_tokens=12, temperature=1.0, seed=9, structured_outputs=dict(regex="[a-z]{3,9}"))
    beams = SamplingParams(use_beam_search=True, beam_width=3, n=3, temperature=0, max_tokens=9, ignore_eos=True)
    requests = {str(i): (p, PARAMS) for i, p in enumerate(prompts)} | {"s": (prompts[4], sampled),
                                                                      "g": (prompts[2], constrained),
                                                                      "b": (prompts[7], beams)}
    small = dict(max_num_seqs=4, num_pages=32)
    base_engine = _engine(tiny, 1, **small)
    base = run(base_engine, requests)
    engine = LLMEngine(tiny.config, tiny.graphdef, tiny.params, tiny.tokenizer,
                       EngineConfig.of(max_num_batched_tokens=16, page_size=4, compilation_cache_dir="",
                                    tensor_parallel_size=tp, data_parallel_size=dp, **small),
                       devices=jax.devices()[:dp * tp])
    outs = run(engine, requests)
    _assert_same([base[str(i)] for i in range(len(prompts))], [outs[str(i)] for i in range(len(prompts))])
    assert [o.token_ids for o in outs["s"].outputs] == [o.token_ids for o in base["s"].outputs]
    assert outs["g"].outputs[0].token_ids == base["g"].outputs[0].token_ids
    assert re.fullmatch("[a-z]{3,9}", outs["g"].outputs[0].text)
    assert [o.token_ids for o in outs["b"].outputs] == [o.token_ids for o in base["b"].outputs]
    assert engine.stats()["steps"] < base_engine.stats()["steps"]  # the replicas ran side by side
    _assert_all_pages_free(engine)
    cache = engine.runner.kv_cache.k
    assert cache.sharding.spec[1] == "data" and cache.addressable_shards[0].data.shape[1] == 32


@pytest.mark.parametrize("sp, tp", [(2, 4), (8, 1)])
def test_sequence_parallel_tiny_model_matches_one_device(tiny, tiny_single, sp, tp):
    """Tokens and KV pages split over `seq` give one device's outputs, a beam search's too (its
    forked pages, striped over the `seq` devices, are copied within their stripe)."""
    prompts, base = tiny_single
    settings = dict(max_num_seqs=8, max_num_batched_tokens=16, page_size=4, num_pages=64, compilation_cache_dir="")
    beams = SamplingParams(use_beam_search=True, beam_width=3, n=3, temperature=0, max_tokens=9, ignore_eos=True)
    want = run(_engine(tiny, 1, **{k: v for k, v in settings.items() if k != "compilation_cache_dir"}),
               {"b": (prompts[1], beams)})["b"]
    engine = LLMEngine(tiny.config, tiny.graphdef, tiny.params, tiny.tokenizer,
                       EngineConfig.of(**settings, tensor_parallel_size=tp, sequence_parallel_size=sp),
                       devices=jax.devices()[:sp * tp])
    outs = run(engine, {str(i): (p, PARAMS) for i, p in enumerate(prompts)} | {"b": (prompts[1], beams)})
    _assert_same(base, [outs[str(i)] for i in range(len(prompts))])
    assert [o.token_ids for o in outs["b"].outputs] == [o.token_ids for o in want.outputs]
    _assert_all_pages_free(engine)
    cache = engine.runner.kv_cache.k
    assert cache.sharding.spec[1] == "seq" and cache.addressable_shards[0].data.shape[1] == 64


def test_sequence_parallel_prefill_of_a_4k_prompt_matches_one_device(tmp_path):
    """A 4096-token prompt prefilled in 512-token chunks, tokens and KV pages split over 8
    devices: every position's logprobs match one device, and so do the decoded tokens."""
    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf

    tiny_gguf(tmp_path / "long.gguf", max_position_embeddings=8192)
    model = load_model(str(tmp_path / "long.gguf"), progress=False)
    prompt = random_prompts(model.config, [4096], seed=9)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=5)
    common = dict(max_num_seqs=8, max_num_batched_tokens=512, page_size=16, compilation_cache_dir="")
    one = LLMEngine(model.config, model.graphdef, model.params, model.tokenizer,
                    EngineConfig.of(num_pages=300, **common))
    sp = LLMEngine(model.config, model.graphdef, model.params, model.tokenizer,
                   EngineConfig.of(num_pages=40, sequence_parallel_size=8, **common))  # 40 pages per device
    base, outs = run(one, {"long": (prompt, params)}), run(sp, {"long": (prompt, params)})
    assert len(base["long"].prompt_logprobs) == 4096
    _assert_same([base["long"]], [outs["long"]])
    assert sp.stats()["steps"] >= 8  # chunked: the later chunks attend across every device's pages


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_smollm2_matches_one_device(smollm2, tp):
    runner = smollm2.engine.runner
    model = type("M", (), dict(config=smollm2.config, graphdef=runner.graphdef, params=runner.params,
                               tokenizer=smollm2.tokenizer))
    prompts = [smollm2.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    base = run(_engine(model, 1, num_pages=32), {str(i): (p, PARAMS) for i, p in enumerate(prompts)})
    engine = _engine(model, tp, num_pages=32)
    outs = run(engine, {str(i): (p, PARAMS) for i, p in enumerate(prompts)})
    _assert_same([base[str(i)] for i in range(2)], [outs[str(i)] for i in range(2)])
    assert engine.config.num_heads % tp == 0 and engine.config.num_kv_heads % tp == 0  # 9 / 3 heads re-laid out


@pytest.mark.slow
@pytest.mark.parametrize("dp, sp, tp", [(2, 1, 4), (8, 1, 1), (1, 2, 4), (1, 8, 1)])
def test_data_and_sequence_parallel_smollm2_match_one_device(smollm2, dp, sp, tp):
    runner = smollm2.engine.runner
    model = type("M", (), dict(config=smollm2.config, graphdef=runner.graphdef, params=runner.params,
                               tokenizer=smollm2.tokenizer))
    texts = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,")
    prompts = [smollm2.tokenizer.encode(t) for t in texts]
    requests = {str(i): (p, PARAMS) for i, p in enumerate(prompts)}
    base = run(_engine(model, 1, num_pages=32), requests)
    engine = LLMEngine(model.config, model.graphdef, model.params, model.tokenizer,
                       EngineConfig.of(max_num_seqs=8, max_num_batched_tokens=16, page_size=4, num_pages=32,
                                    compilation_cache_dir="", tensor_parallel_size=tp, data_parallel_size=dp,
                                    sequence_parallel_size=sp),
                       devices=jax.devices()[:dp * sp * tp])
    outs = run(engine, requests)
    _assert_same([base[str(i)] for i in range(len(texts))], [outs[str(i)] for i in range(len(texts))])
    _assert_all_pages_free(engine)


def test_bad_parallel_configurations_say_what_to_change():
    with pytest.raises(ValueError, match=r"2 x 1 x 2 = 4, but 8 devices .* product is 8"):
        make_mesh(ParallelConfig(data_parallel_size=2, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig.of(tensor_parallel_size=-1)
    with pytest.raises(InvalidRequestError, match="needs attention_backend='reference'"):
        EngineConfig.of(sequence_parallel_size=2, attention_backend="pallas_gpu")
    with pytest.raises(InvalidRequestError, match="together with data_parallel_size > 1 is not supported"):
        EngineConfig.of(sequence_parallel_size=2, data_parallel_size=2)
    with pytest.raises(InvalidRequestError, match="must be a multiple of sequence_parallel_size"):
        EngineConfig.of(sequence_parallel_size=8, max_num_batched_tokens=100)
    assert make_mesh(ParallelConfig(tensor_parallel_size=8)).shape == {"data": 1, "seq": 1, "model": 8}


def test_engine_refuses_a_mesh_that_does_not_use_every_device(tiny):
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size = 1 x 1 x 2 = 2, but 8 devices"):
        LLMEngine(tiny.config, tiny.graphdef, tiny.params, tiny.tokenizer,
                  EngineConfig.of(tensor_parallel_size=2, num_pages=16, compilation_cache_dir=""))
