"""best_of: draw best_of samples sharing the prompt's pages, return the n best by the documented score
(the mean, or the sum, of the sampled tokens' log-probabilities), checked against the scores recomputed
from the returned logprobs and against the same samples drawn as n = best_of."""

from __future__ import annotations

import math

import pytest

from jaxinfer import SamplingParams
from jaxinfer.errors import InvalidSamplingParamsError
from jaxinfer.sampling_params import RequestOutputKind
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing.engine import assert_no_pages_held, run


@pytest.fixture
def tiny(tiny_model):
    return tiny_model


def make_engine(model, **overrides):
    return testing_engine.make_engine(model, **{**dict(max_num_seqs=8, page_size=16, num_pages=160), **overrides})


def _recomputed(c, how):
    total = sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs))
    return total if how == "sum" else total / len(c.token_ids)


@pytest.mark.parametrize("how", ["mean", "sum"])
def test_best_of_returns_the_n_best_by_the_documented_score(tiny, how):
    prompt = [5, 17, 99, 3, 42, 8]
    common = dict(temperature=1.0, seed=21, max_tokens=12, logprobs=0, min_tokens=1)
    engine = make_engine(tiny)
    outs = run(engine, {"best": (prompt, SamplingParams(n=2, best_of=6, best_of_score=how, **common)),
                        "all": (prompt, SamplingParams(n=6, **common)),  # the same six draws (seed + i each)
                        "other": ([7, 7, 7], SamplingParams(max_tokens=5, temperature=0))})
    best, every = outs["best"].outputs, outs["all"].outputs
    assert [c.index for c in best] == [0, 1]
    scores = [_recomputed(c, how) for c in best]
    for c, score in zip(best, scores):
        assert math.isclose(score, c.cumulative_logprob / (1 if how == "sum" else len(c.token_ids)), rel_tol=1e-5)
    assert scores[0] >= scores[1]
    ranked = sorted(every, key=lambda c: -_recomputed(c, how))
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert_no_pages_held(engine)


def test_best_of_without_logprobs_returns_none_and_does_not_stream(tiny):
    outs = run(make_engine(tiny), {"a": ([9, 9, 4], SamplingParams(n=1, best_of=3, temperature=1.0, seed=2,
                                                                     max_tokens=6))})
    (c,) = outs["a"].outputs
    assert c.logprobs is None and c.cumulative_logprob is not None and c.cumulative_logprob < 0
    with pytest.raises(InvalidSamplingParamsError, match="stream"):
        SamplingParams(n=1, best_of=3, output_kind=RequestOutputKind.DELTA)
    with pytest.raises(InvalidSamplingParamsError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(InvalidSamplingParamsError, match="best_of_score"):
        SamplingParams(best_of=2, best_of_score="max")
