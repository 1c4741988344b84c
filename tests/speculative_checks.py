"""The checks every speculative method passes (tests/test_speculative.py: ngram, test_eagle.py,
test_draft_model.py): seeded sampling is unchanged, pages never leak, nothing compiles after warm-up,
SmolLM2's greedy output is plain decoding's."""

from __future__ import annotations

import numpy as np

from jaxinfer.engine import EngineConfig, LLMEngine
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.testing import engine as testing_engine
from tests.test_engine_smollm2 import _prompts as smollm2_prompts


def check_seeded_sampling_gives_the_same_text(model, spec, prompts, temperature: float = 0.8,
                                             top_p: float = 0.9) -> dict:
    """Seeded sampled requests give the same tokens with `spec` as without (each position is drawn with
    plain decoding's key). Returns the speculative engine's stats."""
    params = lambda i: SamplingParams(max_tokens=30, temperature=temperature, top_p=top_p, seed=100 + i,  # noqa: E731
                                      ignore_eos=True)
    plain, _ = testing_engine.generate(model, prompts, params)
    spec_out, engine = testing_engine.generate(model, prompts, params, spec)
    assert spec_out == plain
    return engine.stats()


def check_random_requests_leak_no_pages(model, spec, prompts, seed: int, **settings):
    """len(prompts) requests of random lengths, greedy and sampled, a fifth aborted at random steps
    (some mid-verify), in a pool small enough to preempt: every page ends free or cached-free."""
    rng = np.random.default_rng(seed)
    params = lambda i: SamplingParams(max_tokens=int(rng.integers(1, 30)),  # noqa: E731
                                      temperature=float(rng.choice([0.0, 1.0])), seed=i, ignore_eos=bool(i % 3))
    n = len(prompts)
    abort_after = {str(i): int(rng.integers(1, 40)) for i in rng.choice(n, n // 5, replace=False)}
    outs, engine = testing_engine.generate(model, prompts, params, spec, abort_after=abort_after,
                                           **{**dict(max_num_seqs=8, max_num_batched_tokens=64), **settings})
    assert len(outs) == n
    s = engine.stats()
    assert s["kv_pages_used"] == 0 and s["num_running"] == 0 and not engine.has_unfinished_requests()
    assert s["num_preemptions"] > 0 and s["spec_num_drafts"] > 0
    pool = engine.kv_manager.pool
    assert pool.num_free_blocks == pool.num_blocks - 1  # every page free or cached-free
    return s


def check_nothing_compiles_after_warmup(model, spec, prompts):
    """Warm-up compiles every graph the method needs: greedy and sampled requests, one with logprobs,
    one with a grammar (no drafts: a row of verify steps with a mask), run after it without a compile."""
    engine = testing_engine.make_engine(model, max_num_seqs=4, page_size=16, num_pages=40, speculative_config=spec)
    engine.warmup()
    with testing_engine.compile_events() as events:
        params = lambda i: SamplingParams(max_tokens=12 + i, temperature=0.0 if i % 2 else 0.9, seed=i,  # noqa: E731
                                          ignore_eos=True, logprobs=2 if i == 3 else None,
                                          structured_outputs=dict(regex="[a-z]{3,30}") if i == 1 else None)
        outs = testing_engine.run(engine, {str(i): (p, params(i)) for i, p in enumerate(prompts)})
    assert len(outs) == len(prompts) and engine.stats()["spec_num_drafts"] > 0
    assert events == [], f"{len(events)} compile events after warm-up"


_PLAIN: dict[tuple, list[list[int]]] = {}  # plain decoding's greedy tokens by (LLM, prompts)


def check_smollm2_greedy_is_plain_decoding(smollm2, spec_for_k, ks=(1, 3, 5)) -> dict[int, dict]:
    """The real model with `spec_for_k(k)` for each k: 16 mixed-length prompts submitted together,
    chunked prefill, a pool small enough to preempt, a prompt admitted late that finds another's
    pages in the prefix cache; greedy tokens equal plain decoding's. Returns each k's engine stats."""
    tokenizer = smollm2.get_tokenizer()
    prompts = smollm2_prompts(tokenizer, 16, 128)
    prompts[-1] = prompts[5] + prompts[-1]  # admitted late: finds prompt 5's pages in the prefix cache
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    key = (id(smollm2), tuple(map(tuple, prompts)))
    if key not in _PLAIN:  # (the three methods' tests compare with the same plain decoding: run it once)
        _PLAIN[key] = [o.outputs[0].token_ids
                       for o in smollm2.generate([{"prompt_token_ids": p} for p in prompts], params)]
    plain = _PLAIN[key]
    runner = smollm2.engine.runner
    stats = {}
    for k in ks:
        # k = 3 on the CPU's default layer loop ("hybrid": decode / verify steps of <= 4 rows as one
        # unrolled graph), the others per layer: their verify shapes would compile unrolled graphs
        # of their own (~3 s each) and the loop does not change what a verify step computes
        loop = None if k == 3 else "per_layer"
        engine = LLMEngine(smollm2.config, runner.graphdef, runner.params, tokenizer, EngineConfig.of(
            max_num_seqs=8, max_num_batched_tokens=128, page_size=16, num_pages=28, max_model_len=512,
            speculative_config=spec_for_k(k), layer_loop=loop))
        outs = testing_engine.run(engine, {str(i): (p, params) for i, p in enumerate(prompts)})
        assert [outs[str(i)].outputs[0].token_ids for i in range(16)] == plain, f"k={k}"
        s = stats[k] = engine.stats()
        assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0 and s["kv_pages_used"] == 0, (k, s)
    return stats
