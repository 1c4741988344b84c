"""Speculative method "draft": a smaller model of the same vocabulary proposes with its own paged KV
cache. A draft that is the target itself has every draft accepted (its cache holds the right keys
through chunked prefill, preemption and prefix-cache hits); with a real smaller draft the output is
exactly plain decoding's (greedy and seeded sampling); steps with drafts off run no draft model;
no pages leak; nothing compiles after warm-up; the page pool holds a page of both caches in one
budget; a draft of another vocabulary or context is a typed error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.speculative import SpeculativeConfig
from jaxinfer.speculative.draft import load_draft
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing import tiny_gguf
from tests import speculative_checks


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path, max_position_embeddings=4096)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path, progress=False)


@pytest.fixture(scope="module")
def first_layer(tiny_path, tmp_path_factory):
    """The tiny model's first layer of two, written by `jaxinfer convert --num-layers 1`."""
    from jaxinfer import cli

    out = str(tmp_path_factory.mktemp("draft") / "first-layer")
    assert cli.main(["convert", tiny_path, out, "--num-layers", "1"]) == 0
    return out


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(5, 250, size=int(rng.integers(3, 40)))] for _ in range(n)]


_generate = testing_engine.generate


def _draft(model, k=3, **fields):
    """(drafts at any batch size, the draft model's alone unless lookup_min is given: these tests
    check the mechanics of its cache, not where speculation pays)"""
    return SpeculativeConfig(method="draft", model=model, num_speculative_tokens=k,
                             **{"disable_by_batch_size": None, "lookup_min": None, **fields})


# 16 mixed-length prompts at once, chunked prefill (32-token budget), a pool small enough to preempt,
# two prompts sharing pages in the prefix cache
BUSY = dict(max_num_batched_tokens=32, num_pages=30, max_num_seqs=8)


def _busy_prompts():
    return _prompts(14) + [list(range(40, 80)) * 2, list(range(40, 80)) * 2 + [9]]


# ---- the draft's cache is right: the target as its own draft -------------------------------------

def test_the_target_as_its_own_draft_has_every_draft_accepted(tiny, tiny_path):
    """The draft's keys must be the target's at every position it reads — written by the step's own
    tokens, by its proposals in the look-ahead slots, kept across prefix-cache hits and rebuilt after
    preemption — or the same weights would propose other tokens than the target chooses."""
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    plain, _ = _generate(tiny, _busy_prompts(), params, **BUSY)
    spec, engine = _generate(tiny, _busy_prompts(), params, _draft(tiny_path), **BUSY)
    assert spec == plain
    s = engine.stats()
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0 and s["kv_pages_used"] == 0
    assert s["spec_num_draft_tokens"] > 200
    # (float rounding may differ between the draft's decode rows and the target's verify rows: a rare flip)
    assert s["spec_num_accepted_tokens"] >= 0.97 * s["spec_num_draft_tokens"], s


def test_the_draft_model_runs_only_in_steps_with_drafts_on(tiny, tiny_path):
    """Drafts off from 2 running requests: those steps run no draft model (running it there made
    the method 0.72x plain at 8 concurrent), so a request computed in them has a gap in the draft's
    cache and drafts no more; a request that comes after, alone, drafts again with a whole cache
    (the target as its own draft: every draft accepted). Output is plain decoding's throughout."""
    busy, later = _prompts(3, seed=7), _prompts(1, seed=8)
    params = lambda i: SamplingParams(max_tokens=(6, 6, 30)[i], temperature=0.0, ignore_eos=True)  # noqa: E731
    engine = testing_engine.make_engine(tiny, max_num_seqs=4, page_size=16, num_pages=160,
                                        speculative_config=_draft(tiny_path, disable_by_batch_size=2))
    drafter, steps = engine.runner.drafter, []  # each step: [its request count, whether the draft model ran]
    track, forward = drafter.track, drafter.forward
    drafter.track = lambda chunks, requests: (steps.append([len(chunks), False]), track(chunks, requests))[1]
    drafter.forward = lambda *a, **kw: (steps[-1].__setitem__(1, True), forward(*a, **kw))[1]

    def run(prefix, prompts, params):  # -> {index: token ids}, as testing_engine.generate's {str(index): ...}
        outs = testing_engine.run(engine, {f"{prefix}{i}": (p, params(i)) for i, p in enumerate(prompts)})
        return {str(i): outs[f"{prefix}{i}"].outputs[0].token_ids for i in range(len(prompts))}

    assert run("busy", busy, params) == testing_engine.generate(tiny, busy, params)[0]
    ran, skipped = [n for n, r in steps if r], [n for n, r in steps if not r]
    assert ran and max(ran) < 2 and skipped and min(skipped) >= 2, steps  # busy steps: no draft model
    assert engine.stats()["spec_num_drafts"] == 0  # the last request alone: its cache has a gap
    params = lambda i: SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)  # noqa: E731
    assert run("later", later, params) == testing_engine.generate(tiny, later, params)[0]
    s = engine.stats()
    assert s["spec_num_draft_tokens"] > 10 and s["spec_num_accepted_tokens"] >= 0.97 * s["spec_num_draft_tokens"], s
    testing_engine.assert_no_pages_held(engine)


# ---- a smaller draft: identical output ------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_plain_decodings(tiny, first_layer, k):
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    plain, _ = _generate(tiny, _busy_prompts(), params, **BUSY)
    spec, engine = _generate(tiny, _busy_prompts(), params, _draft(first_layer, k), **BUSY)
    assert spec == plain
    s = engine.stats()
    assert s["spec_num_drafts"] > 0 and 0 < s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"]
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0 and s["kv_pages_used"] == 0


def test_lookup_drafts_in_place_of_the_draft_models_keep_its_cache_right(tiny, tiny_path, monkeypatch):
    """lookup_min: prompt lookup's drafts replace the draft model's where it proposes. Lookup is
    replaced here by an oracle that proposes each prompt's plain continuation at every third output
    position (the tiny model copies nothing from its prompt), so accepted lookup drafts and the
    draft model's alternate; with the target as its own draft, every draft the model proposes after
    lookup's steps must still be accepted: its cache holds what those steps verified. Where lookup's
    drafts take the model's place the draft model decodes nothing for that request."""
    from jaxinfer.runner.drafter import Drafter
    from jaxinfer.speculative import proposers

    decoded, model_drafts = [], Drafter.model_drafts

    def spy(self, requests):  # the histories the draft model decodes from
        decoded.extend(list(r.token_ids) for r in requests)
        return model_drafts(self, requests)
    monkeypatch.setattr(Drafter, "model_drafts", spy)

    prompts = _busy_prompts()
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    plain, _ = _generate(tiny, prompts, params, **BUSY)
    continuations = sorted(((tuple(p), plain[str(i)]) for i, p in enumerate(prompts)), key=lambda c: -len(c[0]))

    def oracle(tokens, k, min_n, max_n):
        prompt, cont = next((p, c) for p, c in continuations if tuple(tokens[:len(p)]) == p)
        done = len(tokens) - len(prompt)
        return list(cont[done:done + k]) if done % 3 == 0 else []
    monkeypatch.setattr(proposers, "propose_ngram", oracle)
    spec, engine = _generate(tiny, prompts, params, _draft(tiny_path, lookup_min=2), **BUSY)
    assert spec == plain
    assert decoded and not any(oracle(tokens, 3, 2, 5) for tokens in decoded)  # none where lookup proposes
    s = engine.stats()
    assert 0 < s["spec_num_lookup_drafts"] < s["spec_num_drafts"]
    assert s["spec_num_lookup_accepted_tokens"] == s["spec_num_lookup_draft_tokens"] > 50  # the oracle is right
    model_drafted = s["spec_num_draft_tokens"] - s["spec_num_lookup_draft_tokens"]
    model_accepted = s["spec_num_accepted_tokens"] - s["spec_num_lookup_accepted_tokens"]
    assert model_drafted > 100 and model_accepted >= 0.97 * model_drafted, s
    assert s["num_preemptions"] > 0 and s["kv_pages_used"] == 0


def test_seeded_sampling_gives_the_same_text(tiny, first_layer):
    s = speculative_checks.check_seeded_sampling_gives_the_same_text(tiny, _draft(first_layer), _prompts(6, seed=3))
    assert s["spec_num_accepted_tokens"] > 0


def test_random_requests_with_aborts_and_preemption_leak_no_pages(tiny, first_layer):
    speculative_checks.check_random_requests_leak_no_pages(tiny, _draft(first_layer), _prompts(200, seed=13), seed=13,
                                                           num_pages=16)


def test_nothing_compiles_after_warmup(tiny, first_layer):
    """Warm-up compiles the draft's forward for every step shape and its proposal for every decode shape."""
    speculative_checks.check_nothing_compiles_after_warmup(tiny, _draft(first_layer), _prompts(6, seed=5))


def test_one_budget_holds_a_page_of_both_caches(tiny, first_layer):
    budget = 4 << 20
    plain = testing_engine.make_engine(tiny, num_pages=None, kv_cache_memory=budget, max_model_len=512)
    draft = testing_engine.make_engine(tiny, num_pages=None, kv_cache_memory=budget, max_model_len=512,
                                       speculative_config=_draft(first_layer))
    # the tiny model has 2 layers, its first-layer draft 1 of the same width: a page costs 1.5x
    assert draft.page_bytes == plain.page_bytes * 3 // 2
    assert draft.num_pages == budget // draft.page_bytes
    runner = draft.runner
    assert runner.drafter.kv_cache.k.shape[1:] == runner.kv_cache.k.shape[1:]  # same pages, slots and heads
    assert runner.drafter.kv_cache.k.shape[0] == 1 and runner.kv_cache.k.shape[0] == 2


# ---- bad input ---------------------------------------------------------------------------------------

def test_a_draft_of_another_vocabulary_or_context_is_a_typed_error(tiny, tiny_path, tmp_path):
    bigger = dataclasses.replace(tiny.config, vocab_size=tiny.config.vocab_size + 8)  # a target of 8 more tokens
    with pytest.raises(InvalidRequestError, match="vocabulary of 259 tokens, the target 267.*share the target's"):
        load_draft(tiny_path, bigger, tiny.tokenizer, 256)

    class Respelled:  # the same ids spelled otherwise
        def id_to_token(self, i):
            return f"<{tiny.tokenizer.id_to_token(i)}>"

    with pytest.raises(InvalidRequestError, match="spells its .* tokens differently"):
        load_draft(tiny_path, tiny.config, Respelled(), 256)
    short = tmp_path / "short.gguf"
    tiny_gguf(short, max_position_embeddings=128)
    with pytest.raises(InvalidRequestError, match="128-token context, shorter than .*max_model_len"):
        testing_engine.make_engine(tiny, max_model_len=512, speculative_config=_draft(str(short)))
    with pytest.raises(InvalidRequestError, match="cannot load the draft model"):
        testing_engine.make_engine(tiny, speculative_config=_draft(str(tmp_path / "missing.gguf")))
    with pytest.raises(InvalidRequestError, match='"draft" needs model='):
        SpeculativeConfig(method="draft")


def test_convert_keeps_the_first_layers_and_checks_the_count(tiny, tiny_path, first_layer, tmp_path, capsys):
    from jaxinfer import cli

    draft = load_model(first_layer, progress=False)
    assert draft.config.num_layers == 1 and draft.config.vocab_size == tiny.config.vocab_size
    np.testing.assert_array_equal(np.asarray(draft.params["layers"]["wq"].get_value()),
                                  np.asarray(tiny.params["layers"]["wq"].get_value())[:1])
    assert cli.main(["convert", tiny_path, str(tmp_path / "x"), "--num-layers", "3"]) != 0
    assert "--num-layers must be in [1, 2]" in capsys.readouterr().err


# ---- the real model ----------------------------------------------------------------------------------

def test_smollm2_greedy_with_a_draft_model_is_plain_decoding(smollm2, tmp_path):
    """SmolLM2 with its own first 6 layers as the draft (`speculative_checks`: 16 prompts together,
    chunked prefill, preemption, prefix-cache hits)."""
    from jaxinfer import cli

    assert cli.main(["convert", "smollm2-135m", str(tmp_path / "smollm2-6"), "--num-layers", "6"]) == 0
    stats = speculative_checks.check_smollm2_greedy_is_plain_decoding(
        smollm2, lambda k: _draft(str(tmp_path / "smollm2-6"), k))
    assert all(s["spec_num_drafts"] > 0 for s in stats.values()), stats
    assert sum(s["spec_num_accepted_tokens"] for s in stats.values()) > 0, stats


def test_readme_draft_commands(tiny_path, tmp_path, capsys, monkeypatch):
    """The docs' draft commands as written, on the tiny model (its path for smollm2-135m, its first
    layer of 2 for the first 6 or 8, and the generate command's --model): each convert writes the
    cut model, and the generate line drafts with it."""
    import os
    import re
    import shlex

    from jaxinfer import cli
    from tests.test_docs import doc_commands

    converts = sorted(c for c in doc_commands() if c.startswith("jaxinfer convert") and "--num-layers" in c)
    (generate,) = {c for c in doc_commands() if c.startswith("jaxinfer generate") and '"draft"' in c}
    assert len(converts) == 2  # README's and docs/BENCHMARKS.md's
    for i, convert in enumerate(converts):
        os.makedirs(tmp_path / str(i))
        monkeypatch.chdir(tmp_path / str(i))
        argv = shlex.split(re.sub(r"--num-layers \d+", "--num-layers 1", convert.replace("smollm2-135m", tiny_path)))
        assert cli.main(argv[1:]) == 0
        assert "keeping the first 1 of 2 layers" in capsys.readouterr().err
        assert os.path.isdir(tmp_path / str(i) / "smollm2-draft")
    assert cli.main(shlex.split(generate)[1:] + ["--model", tiny_path, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
