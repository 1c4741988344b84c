"""EAGLE-style draft head: `jaxinfer train-draft` trains one that loads and proposes, the engine's
output with it is exactly plain decoding's (greedy and seeded sampling), no pages leak, and a head
for another model, a missing head and bad flags are typed errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.speculative import SpeculativeConfig
from jaxinfer.speculative import eagle
from jaxinfer.speculative.prompts import chat_prompts
from jaxinfer.speculative.train import DraftRecipe, answer, draft_vocabulary, train_draft
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing import tiny_gguf
from tests import speculative_checks

TINY_RECIPE = DraftRecipe(num_prompts=24, num_heldout=4, max_tokens=40, generate_batch=16, draft_vocab_size=96,
                          steps=60, batch_size=64, eval_every=30, warmup_steps=10, learning_rate=3e-3)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path, max_position_embeddings=4096)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path, progress=False)


@pytest.fixture(scope="module")
def head_dir(tiny_path, tmp_path_factory):
    """A head trained by the CLI on the tiny model (seconds)."""
    from jaxinfer import cli

    out = str(tmp_path_factory.mktemp("head") / "head")
    argv = ["train-draft", tiny_path, out, "--quiet"]
    for name, value in (("--num-prompts", 24), ("--num-heldout", 4), ("--max-tokens", 40), ("--generate-batch", 16),
                        ("--draft-vocab-size", 96), ("--steps", 60), ("--batch-size", 64), ("--eval-every", 30),
                        ("--learning-rate", 3e-3)):
        argv += [name, str(value)]
    assert cli.main(argv) == 0
    return out


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(5, 250, size=int(rng.integers(3, 40)))] for _ in range(n)]


_generate = testing_engine.generate


def _eagle(head_dir, k=3, **fields):
    """(drafts at any batch size: these tests check the mechanics, not where speculation pays)"""
    return SpeculativeConfig(method="eagle", model=head_dir, num_speculative_tokens=k,
                             **{"disable_by_batch_size": None, **fields})


# ---- training ----------------------------------------------------------------------------------

def test_train_draft_writes_a_head_with_its_figures(head_dir, tiny):
    meta = json.load(open(os.path.join(head_dir, "draft_head.json")))
    assert meta["format"] == eagle.HEAD_FORMAT
    assert meta["target"] == eagle.target_identity(tiny.config, tiny.tokenizer)
    info = meta["training"]
    assert info["recipe"]["steps"] == 60 and len(info["history"]) == 2  # evaluated at 30 and 60
    assert info["heldout_mean_accepted_length"] >= 1.0 and len(info["heldout_acceptance_by_position"]) == 3
    assert info["heldout_head_alone"] >= 1.0  # the head's own drafts (the figure above: the engine's, lookup too)
    assert info["history"][-1]["loss"] < info["history"][0]["loss"] * 1.5  # (it trains; no divergence)
    head = eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer)
    assert head.lm_head.shape == (96, tiny.config.hidden_size) and head.token_map.shape == (96,)
    tokens = np.asarray(head.token_map)
    assert np.all(np.diff(tokens) > 0) and set(tiny.tokenizer.eos_token_ids) <= set(tokens.tolist())


def test_the_head_learns_the_targets_next_tokens(tiny_path, tmp_path):
    """Trained longer on the tiny model, held-out drafts agree with the target far more often than
    the untrained head's do (the figure is the same code path the engine drafts with)."""
    recipe = DraftRecipe(**{**TINY_RECIPE.__dict__, "steps": 150, "eval_every": 150})
    untrained = train_draft(tiny_path, str(tmp_path / "h0"), DraftRecipe(**{**recipe.__dict__, "steps": 1,
                                                                             "eval_every": 1}),
                            progress=False, log=lambda s: None)
    trained = train_draft(tiny_path, str(tmp_path / "h1"), recipe, progress=False, log=lambda s: None)
    # (a random-weight model's answers are hard to predict: the margins are what 150 steps reach)
    assert trained["heldout_mean_accepted_length"] > untrained["heldout_mean_accepted_length"] + 0.05, (
        trained["history"], untrained["history"])
    assert trained["history"][-1]["top1_agreement"][0] > 4 * untrained["history"][-1]["top1_agreement"][0]


def test_answers_are_the_reference_generators_greedy_outputs(tiny):
    """train-draft's data: the engine's waves give what the static-batch oracle gives, in the prompts'
    order, for more prompts than a wave holds (on SmolLM2, whose answers stop at EOS, both keep the
    EOS token: checked by hand, 8 questions, equal)."""
    from jaxinfer.reference import ReferenceGenerator

    prompts = _prompts(11, seed=3)
    got = answer(tiny, prompts, max_tokens=24, batch=4, progress=False)
    gen = ReferenceGenerator(tiny.config, tiny.graphdef, tiny.params)
    want = gen.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=24)] * len(prompts),
                        eos_token_ids=tiny.tokenizer.eos_token_ids)
    assert got == [w.token_ids for w in want]


@pytest.mark.parametrize("lookup_min", [None, 1])  # (the tiny model repeats single tokens only)
def test_the_heldout_figure_is_what_the_engine_measures(tiny, head_dir, lookup_min):
    """train-draft's held-out figure walks each answer as the engine's verify steps do: the engine,
    one request at a time with the same head, reports the same verify steps, drafts accepted and
    acceptance by position (the mean over every position is another, higher-reading figure) — with
    the head's drafts alone, and with prompt lookup's where a suffix of lookup_min tokens recurs."""
    from jaxinfer.model import embedding_arrays
    from jaxinfer.speculative.acceptance import heldout_acceptance, lookup_drafts
    from jaxinfer.speculative.train import build_corpus

    # prompts that end by repeating their start: the tiny model's answers then repeat a few of their tokens
    prompts, max_tokens, k = [p + p[:12] for p in _prompts(6, seed=0)], 40, 3
    head = eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer)
    answers = answer(tiny, prompts, max_tokens=max_tokens, batch=8, progress=False)
    corpus = build_corpus(tiny, list(zip(prompts, answers)), k, progress=False)
    spec = _eagle(head_dir, k, lookup_min=lookup_min)
    lookup = None if lookup_min is None else (lookup_min, spec.prompt_lookup_max)
    acc = heldout_acceptance(head, tiny.config, embedding_arrays(tiny.params), corpus, k, max_tokens, lookup=lookup)
    if lookup is not None:  # (the lookup proposes somewhere, and changes the figure)
        starts = np.concatenate([np.arange(p - 1, e - 2) for _, p, e in corpus.sequences])
        assert (lookup_drafts(corpus, starts, k, lookup)[1] > 0).mean() > 0.1
        assert acc.mean_accepted_length != acc.head_alone
    engine = testing_engine.make_engine(tiny, max_num_seqs=1, page_size=16, num_pages=64, speculative_config=spec)
    outs = testing_engine.run(engine, {str(i): (p, SamplingParams(temperature=0.0, max_tokens=max_tokens))
                                       for i, p in enumerate(prompts)})
    assert [outs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == answers
    s = engine.stats()
    assert s["spec_num_accepted_tokens"] > 0  # (the comparison means something: the drafts land)
    assert acc.mean_accepted_length == pytest.approx(1 + s["spec_num_accepted_tokens"] / s["spec_num_drafts"])
    by_position = [a / max(d, 1) for a, d in zip(s["spec_accepted_by_position"], s["spec_proposed_by_position"])]
    assert acc.by_position == pytest.approx(by_position, abs=1e-4)
    # the lookup's share, counted apart in the engine's stats (and Prometheus)
    assert (s["spec_num_lookup_drafts"], s["spec_num_lookup_draft_tokens"], s["spec_num_lookup_accepted_tokens"]) \
        == (acc.lookup_steps, acc.lookup_drafted, acc.lookup_accepted)
    assert (acc.lookup_steps > 0) == (lookup_min is not None)


def test_draft_vocabulary_keeps_the_most_emitted_tokens_and_eos():
    ids, coverage = draft_vocabulary([[5, 5, 5, 7, 7, 9], [5, 7, 11]], 3, 20, always=[2])
    assert ids.tolist() == [2, 5, 7] and coverage == pytest.approx(7 / 9)
    assert len(set(chat_prompts(300))) == 300 and chat_prompts(5, seed=1) != chat_prompts(5, seed=2)


# ---- the engine with the head: identical output ---------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_plain_decodings(tiny, head_dir, k):
    """16 mixed-length prompts at once, chunked prefill, a pool small enough to preempt, prompts
    sharing pages in the prefix cache."""
    prompts = _prompts(14) + [list(range(40, 80)) * 2, list(range(40, 80)) * 2 + [9]]
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    settings = dict(max_num_batched_tokens=32, num_pages=26, max_num_seqs=8)
    plain, _ = _generate(tiny, prompts, params, **settings)
    spec, engine = _generate(tiny, prompts, params, _eagle(head_dir, k), **settings)
    assert spec == plain
    s = engine.stats()
    assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] > 0  # the head proposed, and well enough
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0 and s["kv_pages_used"] == 0


def test_seeded_sampling_gives_the_same_text(tiny, head_dir):
    s = speculative_checks.check_seeded_sampling_gives_the_same_text(tiny, _eagle(head_dir), _prompts(6, seed=3))
    assert s["spec_num_drafts"] > 0


def test_random_requests_with_aborts_and_preemption_leak_no_pages(tiny, head_dir):
    speculative_checks.check_random_requests_leak_no_pages(tiny, _eagle(head_dir), _prompts(200, seed=11), seed=11,
                                                           num_pages=16)


def test_nothing_compiles_after_warmup(tiny, head_dir):
    """Warm-up compiles the proposer after sample and after verify steps of every sequence bucket."""
    speculative_checks.check_nothing_compiles_after_warmup(tiny, _eagle(head_dir), _prompts(6, seed=5))


# ---- bad input ---------------------------------------------------------------------------------------

def test_a_head_for_another_model_or_no_head_is_a_typed_error(tiny, head_dir, tmp_path):
    other_path = tmp_path / "other.gguf"
    tiny_gguf(other_path, hidden_size=32, num_heads=2, num_kv_heads=1, max_position_embeddings=4096)
    other = load_model(str(other_path), progress=False)
    with pytest.raises(InvalidRequestError, match="trained for another model .*hidden_size.*train-draft"):
        testing_engine.make_engine(other, speculative_config=_eagle(head_dir))
    with pytest.raises(InvalidRequestError, match="not a draft head directory .*train-draft"):
        testing_engine.make_engine(tiny, speculative_config=_eagle(str(tmp_path)))
    with pytest.raises(InvalidRequestError, match='"eagle" needs model='):
        SpeculativeConfig(method="eagle")
    with pytest.raises(InvalidRequestError, match="method 'ngram' takes none"):
        SpeculativeConfig(method="ngram", model=head_dir)


def test_train_draft_flags_are_checked(tiny_path, tmp_path, capsys):
    from jaxinfer import cli

    assert cli.main(["train-draft", tiny_path, str(tmp_path / "h"), "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert cli.main(["train-draft", tiny_path, str(tmp_path / "h"), "--num-heldout", "30", "--num-prompts", "8"]) == 2
    assert "num_heldout" in capsys.readouterr().err


def test_readme_train_draft_and_chat_commands(tiny_path, tmp_path, capsys, monkeypatch):
    """The README's two eagle commands as written, on the tiny model (its path for smollm2-135m) with
    small-size training flags appended: the head trains, saves, and the chat answers through it."""
    import shlex

    from jaxinfer import cli
    from tests.test_docs import doc_commands

    (train,) = {c for c in doc_commands() if c.startswith("jaxinfer train-draft ")}
    (chat,) = {c for c in doc_commands() if c.startswith("jaxinfer chat") and '"eagle"' in c}
    monkeypatch.chdir(tmp_path)
    small = ["--num-prompts", "12", "--num-heldout", "2", "--max-tokens", "24", "--steps", "10", "--eval-every", "10",
             "--draft-vocab-size", "64", "--quiet"]
    assert cli.main(shlex.split(train.replace("smollm2-135m", tiny_path))[1:] + small) == 0
    assert "held-out mean accepted length" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "smollm2-eagle" / "draft_head.json")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello there\n"))
    assert cli.main(shlex.split(chat.replace("smollm2-135m", tiny_path))[1:] + ["--max-tokens", "16"]) == 0
    assert capsys.readouterr().out.startswith("> hello there\n")


# ---- the real model ---------------------------------------------------------------------------------

def test_smollm2_greedy_with_a_draft_head_is_plain_decoding(smollm2, tmp_path):
    """SmolLM2 with an untrained head (its drafts are poor, which verification must not notice;
    `speculative_checks`: 16 prompts together, chunked prefill, preemption, prefix-cache hits)."""
    cfg, tokenizer = smollm2.config, smollm2.get_tokenizer()
    hc = eagle.head_config_for(cfg, 4096)
    eagle.save_head(tmp_path, hc, eagle.init_head(hc, jax.random.key(0)), np.arange(4096),
                    eagle.target_identity(cfg, tokenizer))
    stats = speculative_checks.check_smollm2_greedy_is_plain_decoding(
        smollm2, lambda k: _eagle(str(tmp_path), k))
    assert all(s["spec_num_drafts"] > 0 for s in stats.values()), stats
