"""Scheduler + runner on a tiny random model: any batch composition gives the reference tokens."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.cache import KVCacheManager
from jaxinfer.loader import build_model
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.request import Request
from jaxinfer.runner import Runner, RunnerConfig
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig
from jaxinfer.testing import random_weights, tiny_config


def _serve(cfg, graphdef, params, prompts, sampling, *, num_pages, page_size=4, budget=16, max_num_seqs=8):
    kv = KVCacheManager(num_blocks=num_pages, page_size=page_size)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                          max_model_len=cfg.max_position_embeddings), kv, eos_token_ids=[])
    runner = Runner(cfg, graphdef, params, RunnerConfig(page_size=page_size, num_pages=num_pages,
                                                        max_pages_per_seq=cfg.max_position_embeddings // page_size,
                                                        token_buckets=(8, 16), seq_buckets=(1, 2, 4, 8)))
    requests = [Request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, sampling))]
    by_id = {r.request_id: r for r in requests}
    seeds = {r.request_id: 0 for r in requests}
    for r in requests:
        scheduler.add_request(r)
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out, by_id, seeds))
    assert kv.num_free_blocks == num_pages - 1
    return [r.output_token_ids for r in requests], scheduler


def _assert_served_like_reference(cfg, prompts, sampling, *, num_pages) -> Scheduler:
    """Serves the prompts together; each request's tokens must equal the reference run alone."""
    graphdef, params = build_model(cfg, random_weights(cfg))
    ref = ReferenceGenerator(cfg, graphdef, params)
    got, scheduler = _serve(cfg, graphdef, params, prompts, sampling, num_pages=num_pages)
    for p, sp, tokens in zip(prompts, sampling, got):
        assert tokens == ref.generate([p], [sp])[0].token_ids
    return scheduler


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=False, num_kv_heads=1)])
def test_mixed_batch_matches_reference_alone(overrides):
    cfg = tiny_config(**overrides)
    rng = np.random.default_rng(0)
    lengths = [1, 3, 4, 5, 12, 21, 2]  # page-1, page, page+1, several pages, > the 16-token budget
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    _assert_served_like_reference(cfg, prompts, [SamplingParams(max_tokens=6, temperature=0.0)] * len(prompts),
                                  num_pages=64)


def test_preemption_under_a_small_pool_keeps_the_tokens():
    cfg = tiny_config()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (9, 10, 11, 7)]
    scheduler = _assert_served_like_reference(
        cfg, prompts, [SamplingParams(max_tokens=10, temperature=0.0)] * len(prompts), num_pages=12)
    assert scheduler.num_preemptions > 0


def test_seeded_sampling_matches_the_reference():
    sampling = [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in (3, 4)]
    _assert_served_like_reference(tiny_config(), [[5, 6, 7], [8, 9, 10, 11, 12]], sampling, num_pages=32)
