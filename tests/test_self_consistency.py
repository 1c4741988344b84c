"""Self-consistency: answers extracted and majority-voted; the early stop spends fewer samples once the
vote is decided and never changes the winner (random vote sequences against the full count); seeded
votes reproduce; bad settings are typed errors (HTTP 400)."""

from __future__ import annotations

import random

import pytest

from jaxinfer import SamplingParams, StructuredOutputsParams
from jaxinfer.errors import InvalidRequestError
from jaxinfer.self_consistency import SelfConsistency, should_stop, tally, winner
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing.engine import assert_no_pages_held, run


def make_engine(model, **overrides):
    return testing_engine.make_engine(model, **{**dict(max_num_seqs=8, page_size=16, num_pages=160), **overrides})


def test_the_early_stop_never_changes_the_winner_of_the_full_count():
    rng = random.Random(0)
    stopped = 0
    for trial in range(50):
        n = rng.randint(2, 16)
        alphabet = ["A", "B", "C", None][:rng.randint(1, 4)]
        bias = [rng.random() for _ in alphabet]
        weighted = trial % 2 == 1
        votes_in = [(rng.choices(alphabet, bias)[0], rng.uniform(0.05, 1.0) if weighted else 1.0) for _ in range(n)]
        sc = SelfConsistency(max_samples=max(n, 2), weighted=weighted)
        full = winner(tally(votes_in))
        for k in range(1, n + 1):  # votes arrive one by one; the rule looks after each
            votes = tally(votes_in[:k])
            if should_stop(sc, votes, k, n - k):
                assert winner(votes) == full, (votes_in, k)
                stopped += k < n
                break
    assert stopped > 10  # (the rule did stop early on many of them)


def test_extractors():
    assert SelfConsistency(answer="number").extract("so 12 + 30 = 1,042 apples") == "1042"
    assert SelfConsistency(answer="boxed").extract(r"first \boxed{3}, then \boxed{x+1}") == "x+1"
    assert SelfConsistency(answer="last_line").extract("work\n\n  answer: 7  \n") == "answer: 7"
    assert SelfConsistency(answer=r"Answer: (\w+)").extract("Answer: no ... Answer: yes") == "yes"
    assert SelfConsistency(answer="number").extract("none here") is None


def test_forced_answers_stop_as_soon_as_the_vote_is_decided(tiny_model):
    """Every sample must answer "A" (a one-choice grammar); two run at a time: once 7 of 12 voted
    the other 5 cannot change the vote (7 > 5), so they are stopped or never run (7, or 8 when the
    last two finished in the same step)."""
    engine = make_engine(tiny_model, max_num_seqs=2)
    forced = StructuredOutputsParams(choice=["A"])
    outs = run(engine, {r: ([5, 6, 7], SamplingParams(temperature=1.0, seed=1, max_tokens=4, structured_outputs=forced,
                                                      self_consistency=SelfConsistency(answer="last_line",
                                                                                       max_samples=12, stop_when=w)))
                        for r, w in (("decided", "decided"), ("never", "never"))})
    early, full = outs["decided"].self_consistency, outs["never"].self_consistency
    assert early.answer == full.answer == "A" and early.stopped_early and not full.stopped_early
    assert 7 <= early.num_samples <= 8 and full.num_samples == 12 and early.votes == {"A": early.num_samples}
    assert early.num_tokens < full.num_tokens and len(outs["decided"].outputs) == early.num_samples
    assert_no_pages_held(engine)


def test_seeded_votes_reproduce(tiny_model):
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=4, structured_outputs=StructuredOutputsParams(
        choice=["A", "B", "C"]), self_consistency=SelfConsistency(answer="last_line", max_samples=9, weighted=True))
    first = run(make_engine(tiny_model), {"a": ([8, 9, 10], params)})["a"].self_consistency
    again = run(make_engine(tiny_model, max_num_seqs=3), {"a": ([8, 9, 10], params)})["a"].self_consistency
    assert (first.answer, first.num_samples, first.num_tokens) == (again.answer, again.num_samples, again.num_tokens)
    assert first.votes == pytest.approx(again.votes, rel=1e-5)  # (weights: logprobs of other batch shapes)
    assert first.answer in ("A", "B", "C") and len(first.votes) > 1
    assert first.answer == max(first.votes, key=first.votes.get) and sum(first.votes.values()) < first.num_samples


def test_bad_settings_are_typed_errors():
    for bad in [dict(answer="(unclosed"), dict(max_samples=1), dict(max_samples=1000), dict(stop_when=0.3),
                dict(stop_when="sometimes"), dict(min_samples=0), dict(weighted="yes")]:
        with pytest.raises(InvalidRequestError):
            SelfConsistency(**bad)
    with pytest.raises(InvalidRequestError, match="n at 1"):
        SamplingParams(n=2, self_consistency=SelfConsistency())
    with pytest.raises(InvalidRequestError, match="stream"):
        SamplingParams(self_consistency=SelfConsistency(), output_kind="delta")
    assert SamplingParams(self_consistency=dict(max_samples=5)).num_samples == 5
