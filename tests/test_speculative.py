"""Speculative decoding: prompt-lookup drafts verified in one step give exactly plain decoding's tokens
(greedy and seeded sampling), the verified distribution is the target's even for bad drafts, rejected
drafts leak no pages, and bad settings are typed errors."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinfer.errors import InvalidRequestError
from jaxinfer.loader import load_model
from jaxinfer.sampling import keep_mask
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.speculative import AUTO_DISABLE_BY_BATCH_SIZE, SpeculativeConfig, propose_ngram, speculative_flag
from jaxinfer.speculative.verify import verify
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing import tiny_gguf
from tests import speculative_checks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path, max_position_embeddings=4096)
    return load_model(str(path), progress=False)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Mixed lengths, each a repeated random span (prompt lookup finds matches in them)."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(5, 250, size=int(rng.integers(3, 24)))] * int(rng.integers(2, 4))
            for _ in range(n)]


_generate = testing_engine.generate


def _ngram(k, **fields):
    """(drafts at any batch size: these tests check the mechanics, not where speculation pays)"""
    return SpeculativeConfig(num_speculative_tokens=k, **{"disable_by_batch_size": None, **fields})


# ---- prompt lookup --------------------------------------------------------------------------------

def test_ngram_proposes_what_followed_the_longest_recent_match():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 3) == [4, 5, 1]
    assert propose_ngram([1, 2, 3, 4, 5, 9, 2, 3], 3, 1, 3) == [4, 5, 9]  # suffix (2, 3)
    assert propose_ngram([5, 1, 2, 9, 1, 2], 2, 2, 3) == [9, 1]
    assert propose_ngram([7, 1, 8, 2, 7, 1, 9, 2, 7, 1], 1, 1, 4) == [9]  # the most recent (7, 1)
    assert propose_ngram([3, 4, 3, 4, 3, 9], 2, 1, 4) == []  # 9 never occurred before
    assert propose_ngram([1, 2, 5, 1, 3, 2], 2, 2, 4) == []  # (3, 2) is new; n >= 2 required
    assert propose_ngram([4, 4], 5, 1, 4) == [4]  # a short history: what there is


def test_ngram_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = rng.integers(0, 4, size=int(rng.integers(2, 30))).tolist()
        lo, hi, k = 1 + int(rng.integers(0, 2)), 2 + int(rng.integers(0, 3)), 3
        want = []
        for n in range(min(hi, len(t) - 1), lo - 1, -1):
            starts = [i for i in range(len(t) - n) if t[i:i + n] == t[len(t) - n:]]
            if starts:
                want = t[starts[-1] + n:starts[-1] + n + k]
                break
        assert propose_ngram(t, k, lo, hi) == want, (t, lo, hi)


# ---- verification -----------------------------------------------------------------------------------

def _verify_args(S, temperature, top_p=1.0):
    return (jnp.full(S, temperature, jnp.float32), jnp.zeros(S, jnp.int32), jnp.full(S, top_p, jnp.float32),
            jnp.zeros(S, jnp.float32))


def test_greedy_verification_accepts_the_longest_matching_prefix():
    V = 10
    argmax = np.array([[3, 4, 5, 6], [1, 1, 1, 1], [2, 7, 2, 7]])
    logits = jnp.asarray(np.eye(V)[argmax] * 5.0, jnp.float32)  # [3, 4, V]
    drafts = jnp.asarray([[3, 4, 9], [1, 1, 1], [2, 7, 2]], jnp.int32)
    tokens, accepted = verify(logits, drafts, jnp.asarray([3, 2, 0]), *_verify_args(3, 0.0),
                              jnp.zeros(3, jnp.uint32), jnp.zeros(3, jnp.int32))
    assert tokens.tolist() == argmax.tolist()
    assert accepted.tolist() == [2, 2, 0]  # row 1 proposed only 2; row 2 proposed none


def test_sampled_verification_draws_plain_decodings_token_at_every_position():
    """Position j uses the key of output index first_index + j: the tokens are plain sampling's."""
    from jaxinfer.sampling import sample, step_keys

    rng = np.random.default_rng(1)
    S, K, V = 6, 3, 50
    logits = jnp.asarray(rng.normal(size=(S, K + 1, V)) * 2, jnp.float32)
    seeds = jnp.arange(S, dtype=jnp.uint32) + 7
    first = jnp.asarray(rng.integers(0, 20, size=S), jnp.int32)
    temperature, top_k, top_p, min_p = _verify_args(S, 0.8, 0.9)
    tokens, _ = verify(logits, jnp.zeros((S, K), jnp.int32), jnp.full(S, K), temperature, top_k, top_p, min_p,
                       seeds, first)
    for j in range(K + 1):
        plain = sample(logits[:, j], temperature, top_k, top_p, step_keys(seeds, first + j), min_p)
        assert tokens[:, j].tolist() == plain.tolist()


def test_verified_tokens_follow_the_target_distribution_with_bad_drafts():
    """Chi-square: over 4,000 seeds, the first new token of a verify step whose draft is a bad
    guess (a token of low probability), and the second one after an accepted draft, follow the
    target's distribution (temperature 1, top-p 0.9)."""
    rng = np.random.default_rng(2)
    V, N = 12, 4000
    row = rng.normal(size=(2, V)).astype(np.float32) * 1.5
    probs = []
    for j in range(2):  # the target's filtered distribution at each position
        keep = np.asarray(keep_mask(jnp.asarray(row[j:j + 1]), jnp.ones(1), jnp.zeros(1, jnp.int32),
                                    jnp.full(1, 0.9), None))[0]
        p = np.where(keep, np.exp(row[j] - row[j].max()), 0.0)
        probs.append(p / p.sum())
    bad = int(np.argsort(probs[0])[np.count_nonzero(probs[0] == 0)])  # the least likely kept token
    logits = jnp.broadcast_to(jnp.asarray(row), (N, 2, V))
    tokens, accepted = jax.jit(verify)(logits, jnp.full((N, 1), bad, jnp.int32), jnp.ones(N, jnp.int32),
                                       *_verify_args(N, 1.0, 0.9), jnp.arange(N, dtype=jnp.uint32),
                                       jnp.zeros(N, jnp.int32))
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    assert 0 < accepted.mean() < 0.2  # accepted with probability p(bad), rejected otherwise
    for j, sel in ((0, np.ones(N, bool)), (1, accepted == 1)):
        counts = np.bincount(tokens[sel, j], minlength=V)
        kept = probs[j] > 0
        assert counts[~kept].sum() == 0  # top-p's cut holds
        if j == 1 and sel.sum() < 100:
            continue
        expected = probs[j][kept].astype(np.float64)
        chi2, pvalue = stats.chisquare(counts[kept], expected / expected.sum() * sel.sum())
        assert pvalue > 1e-3, (j, counts, probs[j] * sel.sum())


# ---- the engine ---------------------------------------------------------------------------------------

def _oracle(monkeypatch, continuations: dict[tuple, list[int]], wrong_every: int = 4):
    """Replaces prompt lookup with a proposer that knows each prompt's plain continuation and
    proposes it, every `wrong_every`-th draft position wrong (long accepted runs, partial ones too)."""
    from jaxinfer.speculative import proposers

    def propose(tokens, k, min_n, max_n):
        for prompt, cont in continuations.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                drafts = list(cont[done:done + k])
                return [t if (done + j + 1) % wrong_every else (t + 1) % 200 for j, t in enumerate(drafts)]
        return []
    monkeypatch.setattr(proposers, "propose_ngram", propose)

@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_plain_decodings(tiny, k):
    """16 mixed-length prompts at once, chunked prefill (32-token budget), a pool small enough to
    preempt, shared prompt prefixes in the prefix cache."""
    prompts = _prompts(14) + [list(range(40, 80)) * 2, list(range(40, 80)) * 2 + [9]]  # (the last two share pages)
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    settings = dict(max_num_batched_tokens=32, num_pages=40, max_num_seqs=8)
    plain, _ = _generate(tiny, prompts, params, **settings)
    spec, engine = _generate(tiny, prompts, params, _ngram(k), **settings)
    assert spec == plain
    s = engine.stats()
    assert s["spec_num_accepted_tokens"] > 0 and s["spec_num_drafts"] > 0  # drafts really ran and paid
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0
    assert s["kv_pages_used"] == 0
    assert sum(s["spec_accepted_by_position"]) == s["spec_num_accepted_tokens"]
    assert s["spec_proposed_by_position"][0] == s["spec_num_drafts"]


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(tiny):
    s = speculative_checks.check_seeded_sampling_gives_the_same_text(tiny, _ngram(3), _prompts(6, seed=3),
                                                                     temperature=0.7, top_p=0.95)
    assert s["spec_num_drafts"] > 0


def test_stops_and_max_tokens_inside_an_accepted_run_are_exact(tiny, monkeypatch):
    prompts = [list(range(30 + 10 * i, 60 + 10 * i)) * 3 for i in range(4)]
    plain, _ = _generate(tiny, prompts, lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    _oracle(monkeypatch, {tuple(p): plain[str(i)] for i, p in enumerate(prompts)}, wrong_every=9)
    # stop at a token the plain output reaches mid-way; max_tokens that ends inside a draft run
    stops = {str(i): plain[str(i)][12 + i] for i in range(4)}
    params = lambda i: SamplingParams(max_tokens=13 + 5 * i, temperature=0.0, ignore_eos=True,  # noqa: E731
                                      stop_token_ids=[stops[str(i)]] if i % 2 else None)
    want, _ = _generate(tiny, prompts, params)
    got, engine = _generate(tiny, prompts, params, _ngram(5))
    assert got == want
    assert engine.stats()["spec_num_accepted_tokens"] > 0


def test_request_metrics_report_drafts_and_acceptance(tiny, monkeypatch):
    prompt, params = list(range(30, 60)) * 3, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    plain, _ = _generate(tiny, [prompt], lambda i: params)
    _oracle(monkeypatch, {tuple(prompt): plain["0"]})
    engine = testing_engine.make_engine(tiny, max_num_seqs=2, page_size=16, num_pages=80,
                                        speculative_config=_ngram(4))
    out = testing_engine.run(engine, {"a": (prompt, params)})["a"]
    assert out.outputs[0].token_ids == plain["0"]
    m = out.metrics
    assert engine.counters["steps"] < 15  # a step gave several tokens
    assert m.num_drafts > 0 and 0 < m.num_accepted_tokens <= m.num_draft_tokens <= 4 * m.num_drafts
    assert m.mean_accepted_length == pytest.approx(1 + m.num_accepted_tokens / m.num_drafts)
    s = engine.stats()
    assert (s["spec_num_drafts"], s["spec_num_draft_tokens"], s["spec_num_accepted_tokens"]) == (
        m.num_drafts, m.num_draft_tokens, m.num_accepted_tokens)
    from jaxinfer.metrics import _EngineCollector as EngineCollector

    names = {metric.name: metric for metric in EngineCollector(engine.stats, "tiny").collect()}
    per_pos = names["jaxinfer_spec_decode_num_accepted_tokens_per_pos"].samples
    assert sum(s.value for s in per_pos) == m.num_accepted_tokens
    # method ngram: every draft is prompt lookup's, counted apart too
    assert (s["spec_num_lookup_drafts"], s["spec_num_lookup_accepted_tokens"]) == (m.num_drafts, m.num_accepted_tokens)
    assert names["jaxinfer_spec_decode_num_lookup_drafts"].samples[0].value == m.num_drafts


def test_random_requests_with_drafts_aborts_and_preemption_leak_no_pages(tiny):
    s = speculative_checks.check_random_requests_leak_no_pages(tiny, _ngram(3),
                                                               _prompts(200, seed=7), seed=7, num_pages=30)
    assert s["spec_num_accepted_tokens"] > 0


def test_no_drafts_above_the_batch_size_limit_or_when_they_do_not_pay(tiny):
    prompts = [list(range(30, 60)) * 3] * 4
    params = lambda i: SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)  # noqa: E731
    _, engine = _generate(tiny, prompts, params, SpeculativeConfig(num_speculative_tokens=3, disable_by_batch_size=2))
    assert engine.stats()["spec_num_drafts"] == 0
    # "auto" (the default): the platform's measured limit, 2 running requests on CPU, none on accelerators
    _, engine = _generate(tiny, prompts[:2], params, SpeculativeConfig(num_speculative_tokens=3))
    assert engine.scheduler.config.speculative.disable_by_batch_size == AUTO_DISABLE_BY_BATCH_SIZE["cpu"] == 2
    assert engine.stats()["spec_num_drafts"] == 0
    _, engine = _generate(tiny, prompts[:1], params, SpeculativeConfig(num_speculative_tokens=3))
    assert engine.stats()["spec_num_drafts"] > 0
    assert SpeculativeConfig().resolve("gpu").disable_by_batch_size is None
    assert SpeculativeConfig(disable_by_batch_size=None).resolve("cpu").disable_by_batch_size is None
    # a request whose drafts are all rejected stops proposing after probe_drafts
    _, engine = _generate(tiny, prompts[:1], params, _ngram(3, min_acceptance=1.0, probe_drafts=3))
    s = engine.stats()
    assert 3 <= s["spec_num_draft_tokens"] <= 5 and s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"]


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, match", [
    (dict(method="medusa"), "method must be one of"),
    (dict(num_speculative_tokens=0), r"num_speculative_tokens must be an integer in \[1, 8\]"),
    (dict(num_speculative_tokens=9), r"num_speculative_tokens must be an integer in \[1, 8\]"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "1 <= min <= max"),
    (dict(method="eagle", model="head", lookup_min=5), r"lookup_min must be None .* an integer in \[1, prompt_look"),
    (dict(method="draft", model="draft", lookup_min=0), "lookup_min must be None"),
    (dict(method="eagle", model="head", prompt_lookup_max=1), r"lookup_min .* \[1, prompt_lookup_max=1\], got 2"),
    (dict(disable_by_batch_size=0), "disable_by_batch_size"),
])
def test_bad_settings_are_typed_errors(fields, match):
    with pytest.raises(InvalidRequestError, match=match):
        SpeculativeConfig(**fields)
    with pytest.raises(InvalidRequestError, match=match):
        SpeculativeConfig.of(fields)


def test_lookup_min_is_not_ngrams_setting():
    """ngram's own lookup has prompt_lookup_min: a short prompt_lookup_max stays valid there."""
    assert SpeculativeConfig(method="ngram", prompt_lookup_max=1).prompt_lookup_max == 1


def test_flags_and_engine_settings(tiny):
    assert speculative_flag('{"method": "ngram", "num_speculative_tokens": 2}').num_speculative_tokens == 2
    for text in ('{"num_speculative_tokens": 0}', "ngram", '{"k": 3}'):
        with pytest.raises(argparse.ArgumentTypeError):
            speculative_flag(text)
    with pytest.raises(InvalidRequestError, match="unknown speculative_config fields"):
        testing_engine.make_engine(tiny, speculative_config={"method": "ngram", "k": 3})
    with pytest.raises(InvalidRequestError, match="synchronous steps on one replica"):
        testing_engine.make_engine(tiny, speculative_config={"method": "ngram"}, async_scheduling=True)


def test_smollm2_greedy_with_drafts_is_plain_decoding(smollm2):
    """The real model (`speculative_checks`: 16 mixed-length prompts of input-grounded text, so prompt
    lookup proposes, submitted together, chunked prefill, preemption, prefix-cache hits)."""
    stats = speculative_checks.check_smollm2_greedy_is_plain_decoding(
        smollm2, lambda k: _ngram(k))
    assert all(s["spec_num_accepted_tokens"] > 0 for s in stats.values()), stats
