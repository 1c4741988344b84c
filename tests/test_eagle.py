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
from jaxinfer.speculative import AUTO_HEAD_QUANTIZATION, SpeculativeConfig
from jaxinfer.speculative import eagle
from jaxinfer.speculative.prompts import chat_prompts
from jaxinfer.speculative.corpus import answer, answer_with_hidden, build_corpus, corpus_from_states, draft_vocabulary
from jaxinfer.speculative.train import DraftRecipe, train_draft
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
                        ("--learning-rate", 3e-3), ("--context-window", 64)):  # (a head that attends)
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


def test_the_answers_hidden_states_are_a_forward_pass_over_them(tiny):
    """train-draft's hidden states come with the answers (the engine's sampler rows, over several
    waves): at every row a training start or a held-out walk reads they equal one dense forward
    pass over each prompt + answer (`build_corpus`), and the answers are `answer`'s. So do the keys
    and values of the head's context layer, read from each answer's pages as it finishes, at every
    position the target computed (all but the last)."""
    prompts = _prompts(11, seed=5)
    layer = eagle.context_layer_for(tiny.config)
    answers, states, caches = answer_with_hidden(tiny, prompts, max_tokens=24, batch=4, progress=False,
                                                 context_layer=layer)
    assert answers == answer(tiny, prompts, max_tokens=24, batch=4, progress=False)
    assert [len(h) for h in states] == [len(a) for a in answers]
    assert [len(k) for k, _ in caches] == [len(p) + len(a) - 1 for p, a in zip(prompts, answers)]
    seqs = list(zip(prompts, answers))
    got = corpus_from_states(seqs, states, 3, caches)
    want = build_corpus(tiny, seqs, 3, progress=False, context_layer=layer)
    for name in ("tokens", "starts", "sequences"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    read = np.concatenate([np.arange(p - 1, e - 1) for _, p, e in want.sequences])  # h_{p-1} .. h_{e-2}
    assert np.abs(want.hidden[read]).max() > 0.1
    np.testing.assert_allclose(got.hidden[read], want.hidden[read], rtol=1e-4, atol=1e-4)
    computed = np.concatenate([np.arange(a, e - 1) for a, _, e in want.sequences])
    for name in ("keys", "values"):
        assert np.abs(getattr(want, name)[computed]).max() > 0.1
        np.testing.assert_allclose(getattr(got, name)[computed], getattr(want, name)[computed], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lookup_min", [None, 1])  # (the tiny model repeats single tokens only)
def test_the_heldout_figure_is_what_the_engine_measures(tiny, head_dir, lookup_min):
    """train-draft's held-out figure walks each answer as the engine's verify steps do: the engine,
    one request at a time with the same head, reports the same verify steps, drafts accepted and
    acceptance by position (the mean over every position is another, higher-reading figure) — with
    the head's drafts alone, and with prompt lookup's where a suffix of lookup_min tokens recurs."""
    from jaxinfer.model import embedding_arrays
    from jaxinfer.speculative.acceptance import heldout_acceptance, lookup_drafts

    # prompts that end by repeating their start: the tiny model's answers then repeat a few of their tokens
    prompts, max_tokens, k = [p + p[:12] for p in _prompts(6, seed=0)], 40, 3
    spec = _eagle(head_dir, k, lookup_min=lookup_min, draft_tree=None)  # (the walk's k drafts: a chain)
    quantization = spec.resolve(jax.default_backend()).quantization  # the walk's head stored as the engine's
    head = eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer, quantization=quantization)
    answers = answer(tiny, prompts, max_tokens=max_tokens, batch=8, progress=False)
    corpus = build_corpus(tiny, list(zip(prompts, answers)), k, progress=False, context_layer=head.config.cache_layer)
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

TREES = [None, [[0], [0, 0], [1]], [[0], [1], [0, 0], [2], [1, 0]]]  # a chain; 2 + 1 nodes; 3 + 2


@pytest.mark.parametrize("k,quantization,tree", [(1, "auto", None), (3, "auto", None), (5, "auto", None),
                                                 (3, None, None), (3, "int4", None), (3, "auto", TREES[1]),
                                                 (5, "auto", TREES[2])])
def test_greedy_output_is_plain_decodings(tiny, head_dir, k, quantization, tree):
    """16 mixed-length prompts at once, chunked prefill, a pool small enough to preempt, prompts
    sharing pages in the prefix cache; the head as "auto" stores it (int8 on CPU), float and int4;
    chains and draft trees (max_tokens cuts the last steps' trees, `tree.trim`)."""
    prompts = _prompts(14) + [list(range(40, 80)) * 2, list(range(40, 80)) * 2 + [9]]
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    settings = dict(max_num_batched_tokens=32, num_pages=26, max_num_seqs=8)
    plain, _ = _generate(tiny, prompts, params, **settings)
    spec, engine = _generate(tiny, prompts, params, _eagle(head_dir, k, quantization=quantization, draft_tree=tree),
                             **settings)
    assert spec == plain
    stored = engine.runner.drafter.head.lm_head
    want = AUTO_HEAD_QUANTIZATION.get(jax.default_backend()) if quantization == "auto" else quantization
    assert (f"int{stored.bits}" if isinstance(stored, eagle.QuantizedWeight) else None) == want
    s = engine.stats()
    assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] > 0  # the head proposed, and well enough
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0 and s["kv_pages_used"] == 0


def test_tensor_parallel_greedy_output_is_plain_decodings(tiny, head_dir):
    """Over a 2-device tensor-parallel mesh the head is replicated and its int8 matmuls take the
    partitionable reference (`AttentionSpec.matmul_backend`), not the native CPU kernel."""
    prompts = _prompts(4, seed=7)
    params = lambda i: SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # noqa: E731
    plain, _ = _generate(tiny, prompts, params, max_num_seqs=4)
    from jaxinfer.engine import LLMEngine
    from jaxinfer.engine_config import EngineConfig

    engine = LLMEngine(tiny.config, tiny.graphdef, tiny.params, tiny.tokenizer,
                       EngineConfig.of(max_num_seqs=4, page_size=16, num_pages=160, tensor_parallel_size=2,
                                       speculative_config=_eagle(head_dir, 3, quantization="int8")),
                       devices=jax.devices()[:2])
    outs = testing_engine.run(engine, {str(i): (p, params(i)) for i, p in enumerate(prompts)})
    assert {rid: o.outputs[0].token_ids for rid, o in outs.items()} == plain
    assert engine.runner.drafter.head.lm_head.bits == 8
    assert engine.stats()["spec_num_accepted_tokens"] > 0


@pytest.mark.parametrize("tree", [None, TREES[1]])
def test_seeded_sampling_gives_the_same_text(tiny, head_dir, tree):
    s = speculative_checks.check_seeded_sampling_gives_the_same_text(
        tiny, _eagle(head_dir, len(tree or "abc"), draft_tree=tree), _prompts(6, seed=3))
    assert s["spec_num_drafts"] > 0


def test_random_requests_with_aborts_and_preemption_leak_no_pages(tiny, head_dir):
    """With the CPU default, a draft tree (trimmed where max_tokens ends a request, keys moved where
    a second guess is accepted); a chain's pages are the ngram and draft checks' (`test_speculative`)."""
    speculative_checks.check_random_requests_leak_no_pages(tiny, _eagle(head_dir, 3, draft_tree=TREES[1]),
                                                           _prompts(200, seed=11), seed=11, num_pages=16)


def test_nothing_compiles_after_warmup(tiny, head_dir):
    """Warm-up compiles the proposer after sample and after verify steps of every sequence bucket
    (the CPU default: a draft tree, whose decode steps carry row masks)."""
    speculative_checks.check_nothing_compiles_after_warmup(tiny, _eagle(head_dir, 3, draft_tree=TREES[1]),
                                                           _prompts(6, seed=5))


def test_a_draft_tree_accepts_its_second_guesses(tiny, head_dir):
    """The tree [[0], [0, 0], [1]] verifies the head's second guess for the first token beside its
    top one: with the same head it accepts more than the chain of its first two rows ([[0], [0, 0]],
    what the tree holds beside a2) — the extra tokens are a2's path, whose keys and values moved to
    their slots (the output stays plain decoding's)."""
    prompts = _prompts(10, seed=21)
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # noqa: E731
    plain, _ = _generate(tiny, prompts, params, max_num_seqs=4)
    accepted = {}
    for name, tree in (("chain", [[0], [0, 0]]), ("tree", TREES[1])):
        out, engine = _generate(tiny, prompts, params, _eagle(head_dir, len(tree), draft_tree=tree, lookup_min=None),
                                max_num_seqs=4)
        assert out == plain, name
        accepted[name] = engine.stats()["spec_num_accepted_tokens"]
    assert accepted["tree"] > accepted["chain"], accepted


@pytest.mark.parametrize("bits,max_rms,min_agree", [(8, 0.05, 0.9), (4, 0.2, 0.75)])
def test_a_quantized_head_drafts_as_the_float_head_does(tiny, head_dir, bits, max_rms, min_agree):
    """`quantize_head`: int8 matrices and output rows (a quarter of the bytes a draft step reads), or
    int4 in groups of 32 (an eighth), give nearly the float head's logits and mostly the same drafts
    (random features: the tiny model's answers are near ties more often than SmolLM2's, see
    docs/BENCHMARKS.md)."""
    import jax.numpy as jnp

    from jaxinfer.model import embedding_arrays, embed_tokens, rope_frequencies

    f32 = eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer)
    q = eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer, quantization=f"int{bits}")
    assert all(isinstance(q.params[k], eagle.QuantizedWeight) and q.params[k].bits == bits for k in eagle.HEAD_MATRICES)
    N, D = f32.lm_head.shape
    if bits == 8:
        assert q.lm_head.values.dtype == jnp.int8 and q.lm_head.values.shape == (N, D) and q.lm_head.offset is None
    else:  # packed two to a byte, a scale and offset per 32 inputs
        assert q.lm_head.values.dtype == jnp.uint8 and q.lm_head.values.shape == (N, D // 2)
        assert q.lm_head.scale.shape == q.lm_head.offset.shape == (N, D // 32)
    rng = np.random.default_rng(0)
    feature = jnp.asarray(rng.normal(0, 1, (64, tiny.config.hidden_size)), jnp.float32)
    token = jnp.asarray(rng.integers(0, tiny.config.vocab_size, 64), jnp.int32)
    emb = embed_tokens(tiny.config, embedding_arrays(tiny.params), token)
    cfg, W = tiny.config, f32.config.context_window  # (the head attends: a random cache window too)
    kv = rng.normal(0, 1, (2, 64, W, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32)
    context = eagle.Context(kv[0], kv[1], rng.random((64, W)) < 0.5, rng.integers(0, 100, 64).astype(np.int32),
                            rope_frequencies(cfg))
    logits = {}
    for name, head in (("f32", f32), ("q", q)):
        guess = eagle.head_step(head.params, head.config, feature, emb, context)
        logits[name] = np.asarray(eagle.draft_logits(head.final_norm, head.lm_head, head.config, guess))
    err = logits["q"] - logits["f32"]  # (measured: int8 2.7% relative RMS, 98% of the argmaxes equal; int4 12%, 86%)
    rms = np.sqrt((err ** 2).mean() / (logits["f32"] ** 2).mean())
    agree = (logits["q"].argmax(1) == logits["f32"].argmax(1)).mean()
    assert rms < max_rms and agree > min_agree
    with pytest.raises(InvalidRequestError, match='"int8", "int4" or None'):
        eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer, quantization="int2")


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
    with pytest.raises(InvalidRequestError, match="quantization must be .*got 'int2' for method 'eagle'"):
        _eagle(head_dir, quantization="int2")
    with pytest.raises(InvalidRequestError, match="quantization must be .*got 'int8' for method 'ngram'"):
        SpeculativeConfig(quantization="int8")
    # "auto": int8 on CPU, the target's dtype on accelerators; other methods keep "auto"
    assert _eagle(head_dir).resolve("cpu").quantization == "int8"
    assert _eagle(head_dir).resolve("gpu").quantization is None
    assert SpeculativeConfig().resolve("cpu").quantization == "auto"


def test_train_draft_flags_are_checked(tiny_path, tmp_path, capsys):
    from jaxinfer import cli

    assert cli.main(["train-draft", tiny_path, str(tmp_path / "h"), "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert cli.main(["train-draft", tiny_path, str(tmp_path / "h"), "--num-heldout", "30", "--num-prompts", "8"]) == 2
    assert "num_heldout" in capsys.readouterr().err
    assert cli.main(["train-draft", tiny_path, str(tmp_path / "h"), "--context-window", "-1"]) == 2
    assert "context_window must be a positive integer or None" in capsys.readouterr().err


def test_readme_train_draft_and_chat_commands(tiny_path, tmp_path, capsys, monkeypatch):
    """The README's two eagle commands as written, on the tiny model (its path for smollm2-135m) with
    small-size training flags appended: the head trains, saves, and the chat answers through it."""
    import shlex

    from jaxinfer import cli
    from tests.test_docs import doc_commands

    # the default recipe's (BENCHMARKS also shows earlier recipes: the same command with a flag)
    (train,) = {c for c in doc_commands() if c.startswith("jaxinfer train-draft ") and " --" not in c}
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
    """SmolLM2 with an untrained head that attends over the cache, as the recipe's does (its drafts
    are poor, which verification must not notice; `speculative_checks`: 16 prompts together,
    chunked prefill, preemption, prefix-cache hits)."""
    cfg, tokenizer = smollm2.config, smollm2.get_tokenizer()
    hc = eagle.head_config_for(cfg, 4096, context_window=64)
    eagle.save_head(tmp_path, hc, eagle.init_head(hc, jax.random.key(0)), np.arange(4096),
                    eagle.target_identity(cfg, tokenizer))
    stats = speculative_checks.check_smollm2_greedy_is_plain_decoding(
        smollm2, lambda k: _eagle(str(tmp_path), k))
    assert all(s["spec_num_drafts"] > 0 for s in stats.values()), stats


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_the_heads_context_is_its_window_of_the_paged_cache(tiny, head_dir, kv_cache_dtype):
    """`steps.head_context` reads a row's window from its pages: the keys and values written at its
    positions (float pages exactly; 8-bit pages hold rotated heads, and the head's attention rotates
    its query and output to match), masked past t and before t - W + 1, and the head's step on it
    equals the step on the same window given directly (as training gives it)."""
    from jaxinfer.model import rope_frequencies
    from jaxinfer.paged_attention import PagedKVCache
    from jaxinfer.runner.inputs import build_head_context
    from jaxinfer.runner.requests import CachedRequest
    from jaxinfer.runner.steps import head_context
    from jaxinfer.scheduler_output import ScheduledChunk
    from pallas_kernels import ops
    from pallas_kernels.kv_quant import rotate

    import dataclasses

    import jax.numpy as jnp

    cfg, head = tiny.config, eagle.load_head(head_dir, tiny.config, tiny.params, tiny.tokenizer)
    W, L, K, H, page = head.config.context_window, head.config.context_layer, cfg.num_kv_heads, cfg.head_dim, 16
    rng = np.random.default_rng(1)
    # (an attention output that weighs: the trained head's W_o has barely left zero in 60 steps)
    head = dataclasses.replace(head, params={**head.params, "wo": jnp.asarray(
        rng.normal(0, 0.5, head.params["wo"].shape), jnp.float32)})
    lengths = [150, 40]  # a row whose window starts mid-page, one shorter than the window
    pages = rng.permutation(np.arange(1, 40))  # (each row its own pages, scattered)
    blocks = [list(pages[:12]), list(pages[12:16])]
    cache = PagedKVCache.zeros(num_layers=cfg.num_layers, num_pages=40, page_size=page, num_kv_heads=K, head_dim=H,
                               dtype=jnp.float32, kv_cache_dtype=kv_cache_dtype)
    kv = [rng.normal(0, 1, (2, n, K, H)).astype(np.float32) for n in lengths]
    for b, x, n in zip(blocks, kv, lengths):
        pos = np.arange(n)
        slots = jnp.asarray(np.asarray(b)[pos // page] * page + pos % page, jnp.int32)
        k, v = (jnp.asarray(a) for a in x)
        if kv_cache_dtype != "auto":
            k, v = rotate(k), rotate(v)
        cache = PagedKVCache(*ops.write_kv(cache.k, cache.v, k, v, slots, layer=L))
    requests = {str(i): CachedRequest(str(i), list(range(n)), n - 1, None, 0, block_ids=[int(x) for x in b])
                for i, (b, n) in enumerate(zip(blocks, lengths))}
    chunks = [ScheduledChunk(str(i), n - 1, 1, (), True) for i, n in enumerate(lengths)]  # decodes of the last
    ci = build_head_context(chunks, requests, 4, W, 3, page)
    ctx = head_context(head, cache, ci, rope_frequencies(cfg))
    feature = jnp.asarray(rng.normal(0, 1, (4, cfg.hidden_size)), jnp.float32)
    emb = jnp.asarray(rng.normal(0, 1, (4, cfg.hidden_size)), jnp.float32)
    got = np.asarray(eagle.head_step(head.params, head.config, feature, emb, ctx, 1))
    for s, (x, n) in enumerate(zip(kv, lengths)):
        t = n - 1
        at = np.asarray(ci.base[s]) + np.arange(ctx.keys.shape[1])
        mask = np.asarray(ctx.valid[s])
        np.testing.assert_array_equal(at[mask], np.arange(max(0, t - W + 1), t + 1))  # the window, exactly
        window = eagle.Context(x[0][at[mask]][None], x[1][at[mask]][None], np.ones((1, mask.sum()), bool),
                               np.asarray([t], np.int32), rope_frequencies(cfg))
        want = np.asarray(eagle.head_step(head.params, head.config, feature[s:s + 1], emb[s:s + 1], window, 1))
        tol = 1e-5 if kv_cache_dtype == "auto" else 1e-2  # (measured: 0.3% for 8-bit pages)
        np.testing.assert_allclose(got[s:s + 1], want, rtol=tol, atol=tol * np.abs(want).max())
        short = dataclasses.replace(window, valid=np.arange(mask.sum())[None] < mask.sum() - 1)  # t left out
        off = np.asarray(eagle.head_step(head.params, head.config, feature[s:s + 1], emb[s:s + 1], short, 1))
        assert np.abs(off - want).max() > 3 * tol * np.abs(want).max()  # (a window one position short: far)


def test_a_verify_step_padded_for_logprobs_drafts_with_a_head_that_attends(tiny, head_dir):
    """A step whose sampler is compiled for the largest bucket only (its requests want logprobs)
    pads its verify rows to that bucket; the head's cache windows are padded with them (two
    requests in a bucket of four: unpadded, the step failed on [2] + [4]), and the output is still
    plain decoding's."""
    prompts = _prompts(2, seed=7)  # (two sequence slots of a bucket of four)
    params = lambda i: SamplingParams(temperature=0.0, max_tokens=24, logprobs=2)  # noqa: E731
    want, _ = _generate(tiny, prompts, params)
    got, engine = _generate(tiny, prompts, params, _eagle(head_dir))
    assert got == want
    assert engine.stats()["spec_num_drafts"] > 0
