"""Beam search: the beams HF transformers' `generate(num_beams=W)` returns on SmolLM2 (fixture from
tests/fixtures/make_hf_reference.py), batched with other requests; pages shared between beams and
all freed; the same beams under preemption and async scheduling; the page fork itself; bad input."""

from __future__ import annotations

import json
import math
import os

import pytest

from jaxinfer import SamplingParams
from jaxinfer.beam_search import BeamSearch
from jaxinfer.cache import KVCacheManager
from jaxinfer.errors import InvalidRequestError, InvalidSamplingParamsError
from jaxinfer.sampling_params import RequestOutputKind
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing.engine import assert_no_pages_held, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_hf_beams.json")


def beam(width, **kw):
    return SamplingParams(use_beam_search=True, beam_width=width, n=kw.pop("n", width), temperature=0, **kw)


def test_beams_equal_hf_transformers_batched_with_other_requests(smollm2):
    """W in {2, 4}, length_penalty 1.0 and 0.5, six prompts, 24 new tokens: every returned beam's
    token ids, in HF's order, with HF's score; all 24 searches and two sampled requests in one run."""
    with open(FIXTURE, encoding="utf-8") as f:
        meta = json.load(f)
    engine = smollm2.engine
    assert sorted(engine.tokenizer.eos_token_ids) == sorted(meta["eos_token_ids"])
    cases = meta["cases"]
    assert {(c["beam_width"], c["length_penalty"]) for c in cases} == {(2, 1.0), (2, 0.5), (4, 1.0), (4, 0.5)}
    assert len({tuple(c["prompt_token_ids"]) for c in cases}) == 6
    before = engine.stats()
    prompts = [{"prompt_token_ids": c["prompt_token_ids"]} for c in cases] + ["The sea is", "Numbers: 1, 2,"]
    params = [beam(c["beam_width"], max_tokens=meta["max_new_tokens"], length_penalty=c["length_penalty"])
              for c in cases] + [SamplingParams(temperature=0.8, seed=3, max_tokens=30)] * 2
    outs = smollm2.generate(prompts, params)
    for case, out in zip(cases, outs):
        hf = case["beams"]
        assert [o.token_ids for o in out.outputs] == [b["token_ids"] for b in hf], (case["prompt"]["text"],
                                                                                  case["beam_width"])
        for o, b in zip(out.outputs, hf):
            score = o.cumulative_logprob / len(o.token_ids) ** case["length_penalty"]
            assert math.isclose(score, b["score"], rel_tol=1e-4, abs_tol=1e-4)
            assert o.finish_reason == ("stop" if o.token_ids[-1] in meta["eos_token_ids"] else "length")
            assert o.text == smollm2.tokenizer.decode(o.token_ids)
        assert out.metrics.num_beam_tokens >= case["beam_width"] * (max(len(b["token_ids"]) for b in hf) - 1)
    assert all(len(o.outputs[0].token_ids) == 30 or o.outputs[0].finish_reason == "stop" for o in outs[-2:])
    after = engine.stats()
    assert after["beam_shared_pages"] > before["beam_shared_pages"]  # forks shared pages instead of recomputing
    assert after["beam_page_copies"] > before["beam_page_copies"]
    assert after["kv_pages_used"] == 0 and not engine.scheduler.requests


@pytest.fixture
def tiny(tiny_model):
    return tiny_model


def make_engine(model, **overrides):
    return testing_engine.make_engine(model, **{**dict(max_num_seqs=12, page_size=4, num_pages=400), **overrides})


def _searches(seed_prompts):
    return {f"b{i}": (p, beam(w, max_tokens=18, length_penalty=lp, early_stopping=es))
            for i, (p, w, lp, es) in enumerate(seed_prompts)}


SEARCHES = [([5, 17, 99, 3, 42, 8, 11, 12, 13, 14], 4, 1.0, False), ([7, 7, 7], 3, 0.5, "never"),
            ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], 4, 1.0, True),
            ([40, 41], 1, 1.0, False)]


@pytest.fixture(scope="module")
def reference_beams(tiny_model):
    """The searches on an engine with room for everything (no preemption)."""
    engine = make_engine(tiny_model)
    outs = run(engine, _searches(SEARCHES))
    assert engine.stats()["num_preemptions"] == 0
    assert_no_pages_held(engine)
    return {rid: [(o.token_ids, o.cumulative_logprob) for o in out.outputs] for rid, out in outs.items()}


def test_beams_survive_preemption_and_recompute(tiny, reference_beams):
    """A pool too small for every beam at once: beams are preempted (awaiting their search or not)
    and recomputed; the searches return the same beams and the pool ends empty."""
    engine = make_engine(tiny, num_pages=20, max_num_batched_tokens=16)
    outs = run(engine, _searches(SEARCHES))
    assert engine.stats()["num_preemptions"] > 0
    assert {rid: [(o.token_ids, pytest.approx(o.cumulative_logprob, abs=1e-4)) for o in out.outputs]
            for rid, out in outs.items()} == reference_beams
    assert_no_pages_held(engine)


def test_beams_with_async_scheduling_and_a_width_of_one(tiny, reference_beams):
    engine = make_engine(tiny, async_scheduling=True)
    outs = run(engine, {**_searches(SEARCHES), "g": ([40, 41], SamplingParams(temperature=0, max_tokens=18))})
    assert {rid: [(o.token_ids, pytest.approx(o.cumulative_logprob, abs=1e-4)) for o in out.outputs]
            for rid, out in outs.items() if rid != "g"} == reference_beams
    (best,) = outs["b3"].outputs  # beam_width 1 is greedy search (unless an end-of-sequence token wins)
    if tiny.tokenizer.eos_token_ids[0] not in outs["g"].outputs[0].token_ids:
        assert best.token_ids == outs["g"].outputs[0].token_ids
    assert_no_pages_held(engine)


def test_aborting_a_beam_search_frees_every_page(tiny):
    engine = make_engine(tiny)
    outs = run(engine, _searches(SEARCHES[:2]), abort_after={"b0": 4})
    assert all(o.finish_reason == "abort" for o in outs["b0"].outputs)
    assert [o.finish_reason for o in outs["b1"].outputs] != ["abort"] * 3
    assert_no_pages_held(engine)
    engine.step()  # (the runner hears of the last ends at the next step)
    assert not engine.runner.requests


def test_fork_shares_full_pages_and_copies_a_shared_partial_page():
    kv = KVCacheManager(num_blocks=32, page_size=4)

    class Req:
        def __init__(self, rid, tokens):
            self.request_id, self.all_token_ids, self.num_computed_tokens = rid, tokens, 0

    a, b = Req("a", list(range(10))), Req("b", [])
    kv.allocate_slots(a, 10)  # 3 pages: two full, one holding 2 tokens
    pa = kv.get_block_ids("a")
    copies = kv.fork([("a", "a", 10), ("b", "a", 10)])
    pb = kv.get_block_ids("b")
    assert kv.get_block_ids("a") == pa and pb[:2] == pa[:2] and pb[2] != pa[2]
    assert copies == [(pa[2], pb[2])]
    blocks = kv.pool.blocks
    assert [blocks[i].ref_cnt for i in pa] == [2, 2, 1] and blocks[pb[2]].ref_cnt == 1
    # b continues a's first 8 tokens (page-aligned: nothing to copy), a continues b
    copies = kv.fork([("a", "b", 8), ("b", "a", 10)])
    assert copies == [] and kv.get_block_ids("a") == pb[:2] and kv.get_block_ids("b") == pa
    assert blocks[pb[2]].ref_cnt == 0 and [blocks[i].ref_cnt for i in pa] == [2, 2, 1]
    kv.free(a)
    kv.free(b)
    assert all(blk.ref_cnt == 0 for blk in blocks) and kv.num_free_blocks == 31


def test_search_stops_as_hf_early_stopping_says():
    """Two beams; token 0 ends a beam. early_stopping=True stops once two beams finished; False goes
    on while the best running beam could still beat the worst finished one; at max_new_tokens the
    best two candidates are finished as "length"."""
    def run_search(early_stopping, steps):
        s = BeamSearch("r", ["r#0", "r#1"], early_stopping=early_stopping, max_new_tokens=5, stop_token_ids=[0])
        for i, top in enumerate(steps):
            for rid in s.running_ids:
                s.report(rid, top[rid])
            forks, done = s.select()
            if done:
                return s, i + 1
        return s, None
    first = {"r#0": [(0, -0.1), (5, -0.2), (6, -3.0), (7, -4.0)]}
    second = {"r#0": [(0, -0.05), (8, -2.0), (9, -2.5), (3, -5.0)], "r#1": [(0, -0.3), (4, -0.4), (2, -5.0), (3, -6)]}
    s, at = run_search(True, [first, second])
    assert at == 2 and [h.token_ids for h in s.result().hypotheses] == [[0], [5, 0]]
    assert s.result().hypotheses[0].finish_reason == "stop"
    s, at = run_search(False, [first, second])
    assert at == 2  # the best running beam (-2.2 at length 2: -1.1) cannot beat -0.25 / 2
    later = {"r#0": [(1, -0.01), (2, -0.02), (3, -0.03), (4, -0.04)], "r#1": [(1, -0.01), (2, -0.02), (3, -9), (4, -9)]}
    s, at = run_search(False, [{"r#0": [(1, -0.1), (2, -0.2), (3, -3.0), (4, -4.0)]}] + [later] * 4)
    assert at == 5 and all(h.finish_reason == "length" and len(h.token_ids) == 5 for h in s.result().hypotheses)


def test_bad_beam_search_input_gets_typed_errors(tiny):
    with pytest.raises(InvalidSamplingParamsError, match="temperature=0"):
        SamplingParams(use_beam_search=True, beam_width=2)
    with pytest.raises(InvalidSamplingParamsError, match="beam_width"):
        beam(0, n=1)
    with pytest.raises(InvalidSamplingParamsError, match="n=3"):
        beam(2, n=3)
    with pytest.raises(InvalidSamplingParamsError, match="stop"):
        beam(2, stop=["\n"])
    with pytest.raises(InvalidSamplingParamsError, match="stream"):
        beam(2, output_kind=RequestOutputKind.DELTA)
    with pytest.raises(InvalidSamplingParamsError, match="use_beam_search"):
        SamplingParams(length_penalty=0.5)
    with pytest.raises(InvalidSamplingParamsError, match="early_stopping"):
        beam(2, early_stopping="sometimes")
    engine = make_engine(tiny, max_num_seqs=4)
    with pytest.raises(InvalidRequestError, match="beam_width=5 is over this engine's maximum of 4"):
        engine.add_request("x", [1, 2, 3], beam(5))
    assert not engine.has_unfinished_requests()
