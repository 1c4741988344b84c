"""The scheduler on the host, driven by a mock model whose next token is a function of the tokens
so far (hand-computable), so every schedule can be checked against running each request alone."""

from __future__ import annotations

import random

import pytest

from jaxinfer.cache import KVCacheManager
from jaxinfer.request import Request, RequestStatus
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig

EOS = 1


def mock_next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 97 + 2  # never EOS


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        t = mock_next_token(tokens)
        out.append(t)
        tokens.append(t)
    return out


def create_scheduler(*, num_blocks=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                     caching=True, policy="fcfs", max_model_len=4096) -> Scheduler:
    kv = KVCacheManager(num_blocks=num_blocks, page_size=page_size, enable_prefix_caching=caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, policy=policy)
    return Scheduler(config, kv, eos_token_ids=[EOS])


def create_requests(lengths, max_tokens=8, seed=0, prefix=()):
    rng = random.Random(seed)
    return [Request(f"r{i}", [*prefix, *(rng.randrange(2, 99) for _ in range(n))],
                    SamplingParams(max_tokens=max_tokens))
            for i, n in enumerate(lengths)]


class MockRunner:
    """Keeps what the real runner keeps of each request (its tokens: the prompt, sent once, plus what
    it sampled; its page table, grown by each chunk's new pages), driven by SchedulerOutputs alone,
    and checks every chunk against it."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.tokens: dict[str, list[int]] = {}
        self.pages: dict[str, list[int]] = {}

    def execute(self, out, forced: dict[str, int] | None = None) -> dict[str, list[int]]:
        """The tokens each sampling chunk samples (the mock model's, or `forced`'s)."""
        for rid in out.finished_ids:
            self.tokens.pop(rid, None), self.pages.pop(rid, None)  # (None: scheduled without this runner)
        for rid in out.preempted_ids:
            self.pages[rid] = []  # recomputed later from scratch, with new pages
        for new in out.new_requests:
            assert new.request_id not in self.tokens
            self.tokens[new.request_id] = list(new.prompt_token_ids)
            self.pages[new.request_id] = []
        sampled = {}
        for c in out.chunks:
            tokens, pages = self.tokens[c.request_id], self.pages[c.request_id]
            pages.extend(c.new_block_ids)
            end = c.start_pos + c.num_tokens
            assert len(set(pages)) == len(pages) and len(pages) * self.page_size >= end
            assert end <= len(tokens) and c.samples == (end == len(tokens))  # the runner knows every token
            if c.samples:
                sampled[c.request_id] = [(forced or {}).get(c.request_id, mock_next_token(tokens))]
                tokens += sampled[c.request_id]
        return sampled


def run_to_completion(scheduler: Scheduler, async_scheduling: bool = False, max_steps=10_000,
                      runner: MockRunner | None = None) -> tuple[dict[str, list[int]], list]:
    """Steps the scheduler with the mock model; returns outputs and the SchedulerOutputs seen. With
    async scheduling step N + 1 is scheduled (and run) before step N's tokens reach `update`."""
    runner = runner or MockRunner(scheduler.kv.page_size)
    done, outputs, in_flight = {}, [], None
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests() and in_flight is None:
            break
        out = scheduler.schedule()
        assert out.num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        assert len(out.chunks) <= scheduler.config.max_num_seqs
        outputs.append(out)
        step = (out, runner.execute(out))
        if async_scheduling:
            step, in_flight = in_flight, (step if not out.is_empty else None)
            if step is None:
                continue
        live = dict(scheduler.requests)
        for u in scheduler.update(*step).finished:
            done[u.request_id] = list(live[u.request_id].output_token_ids)
            assert u.new_token_ids == done[u.request_id][-1:]
            n = live[u.request_id].num_prompt_tokens
            assert runner.tokens[u.request_id][n:n + len(done[u.request_id])] == done[u.request_id]
    assert not scheduler.has_unfinished_requests()
    return done, outputs


def assert_no_pages_held(scheduler: Scheduler) -> None:
    kv = scheduler.kv
    assert kv.num_free_blocks == kv.pool.num_blocks - 1 and not kv.req_to_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


ASYNC = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


@ASYNC
def test_mixed_lengths_match_each_request_alone_with_chunking(async_scheduling):
    scheduler = create_scheduler()
    requests = create_requests([1, 3, 4, 5, 13, 40, 70, 2])  # 40 and 70 exceed the 32-token budget
    for r in requests:
        scheduler.add_request(r)
    done, outputs = run_to_completion(scheduler, async_scheduling)
    for r in requests:
        assert done[r.request_id] == expected_output(r.prompt_token_ids, 8)
        assert r.status is RequestStatus.FINISHED_LENGTH
    chunked = [c for o in outputs for c in o.chunks if c.request_id == "r6" and not c.samples]
    assert chunked, "the 70-token prompt is prefilled in several chunks"
    mixed = [o for o in outputs
             if any(c.num_tokens == 1 for c in o.chunks) and any(c.num_tokens > 1 for c in o.chunks)]
    assert mixed, "some steps mix decodes with prefill chunks"
    assert_no_pages_held(scheduler)


@ASYNC
def test_preemption_when_pages_run_out_loses_nothing(async_scheduling):
    scheduler = create_scheduler(num_blocks=12, page_size=4)  # 11 pages: not enough for all at once
    requests = create_requests([9, 10, 11, 12], max_tokens=12)
    for r in requests:
        scheduler.add_request(r)
    done, _ = run_to_completion(scheduler, async_scheduling)
    assert scheduler.num_preemptions > 0
    for r in requests:
        assert done[r.request_id] == expected_output(r.prompt_token_ids, 12)
    assert_no_pages_held(scheduler)


@ASYNC
def test_prefix_cache_skips_shared_pages(async_scheduling):
    scheduler = create_scheduler(page_size=4)
    first, = create_requests([13], seed=1)
    scheduler.add_request(first)
    runner = MockRunner(4)
    run_to_completion(scheduler, async_scheduling, runner=runner)
    second = Request("again", first.prompt_token_ids[:12] + [5, 6], SamplingParams(max_tokens=4))
    scheduler.add_request(second)
    _, outputs = run_to_completion(scheduler, async_scheduling, runner=runner)
    assert second.num_cached_tokens == 12  # 3 pages shared
    assert outputs[0].chunks[0].start_pos == 12 and outputs[0].chunks[0].num_tokens == 2
    assert second.output_token_ids == expected_output(second.prompt_token_ids, 4)


@ASYNC
def test_abort_anywhere_frees_everything(async_scheduling):
    scheduler = create_scheduler(max_num_batched_tokens=8)
    requests = create_requests([30, 5, 6])
    for r in requests:
        scheduler.add_request(r)
    runner = MockRunner(4)
    out = scheduler.schedule()  # r0 mid-prefill (8 of 30 tokens)
    scheduler.update(out, runner.execute(out))
    assert scheduler.abort("r0") and requests[0].status is RequestStatus.FINISHED_ABORTED
    assert scheduler.abort("r2")  # still waiting
    assert not scheduler.abort("r2") and not scheduler.abort("nope")
    done, _ = run_to_completion(scheduler, async_scheduling, runner=runner)
    assert set(done) == {"r1"}
    assert_no_pages_held(scheduler)


def test_results_of_a_request_aborted_after_scheduling_are_dropped():
    scheduler = create_scheduler()
    r, = create_requests([5])
    scheduler.add_request(r)
    out = scheduler.schedule()
    scheduler.abort("r0")
    assert scheduler.update(out, {"r0": [7]}).requests == [] and r.output_token_ids == []
    assert_no_pages_held(scheduler)


def test_a_step_in_flight_ending_a_request_is_not_followed_by_more_work():
    """Async: while step N (which samples a request's last allowed token) is in flight, the next
    schedule gives the request nothing; an EOS in step N ends it and step N + 1's token is dropped."""
    scheduler = create_scheduler()
    a = Request("a", [2, 3], SamplingParams(max_tokens=1))
    b = Request("b", [4, 5], SamplingParams(max_tokens=50))
    for r in (a, b):
        scheduler.add_request(r)
    first = scheduler.schedule()
    assert a.num_pending_tokens == b.num_pending_tokens == 1
    second = scheduler.schedule()  # scheduled before the first step's tokens are back
    assert [(c.request_id, c.start_pos, c.num_tokens) for c in second.chunks] == [("b", 2, 1)]
    assert [u.finished for u in scheduler.update(first, {"a": [7], "b": [EOS]}).requests] == [True, True]
    assert a.output_token_ids == [7] and b.output_token_ids == [EOS]
    assert scheduler.update(second, {"b": [8]}).requests == [] and b.output_token_ids == [EOS]
    assert scheduler.schedule().finished_ids == ("a", "b")
    assert_no_pages_held(scheduler)


def test_stops_on_eos_stop_token_and_context_end():
    scheduler = create_scheduler(max_model_len=12)
    a = Request("a", [2, 3], SamplingParams(max_tokens=50))
    b = Request("b", [4, 5], SamplingParams(max_tokens=50, stop_token_ids=[9]))
    c = Request("c", [6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    for r in (a, b, c):
        scheduler.add_request(r)
    runner, out = MockRunner(4), scheduler.schedule()
    update = scheduler.update(out, runner.execute(out, forced={"a": EOS, "b": 9, "c": EOS}))
    assert [(u.request_id, u.new_token_ids, u.finished) for u in update.requests] == [
        ("a", [EOS], True), ("b", [9], True), ("c", [EOS], False)]
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason is None
    assert b.status is RequestStatus.FINISHED_STOPPED and b.stop_reason == 9
    assert c.status is RequestStatus.RUNNING
    run_to_completion(scheduler, runner=runner)
    assert c.status is RequestStatus.FINISHED_LENGTH and c.num_tokens == 12


def test_sequence_cap_and_priority_policy():
    scheduler = create_scheduler(max_num_seqs=2, policy="priority")
    low = Request("low", [2, 3], SamplingParams(max_tokens=2), priority=5)
    high = Request("high", [4, 5], SamplingParams(max_tokens=2), priority=0)
    mid = Request("mid", [6, 7], SamplingParams(max_tokens=2), priority=1)
    for r in (low, high, mid):
        scheduler.add_request(r)
    first = scheduler.schedule()
    assert [c.request_id for c in first.chunks] == ["high", "mid"]


def test_duplicate_request_id_and_bad_config():
    scheduler = create_scheduler()
    scheduler.add_request(Request("x", [2], SamplingParams()))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(Request("x", [3], SamplingParams()))
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="random")


@ASYNC
def test_randomized_200_requests_with_aborts_leak_no_pages(async_scheduling):
    rng = random.Random(0)
    scheduler = create_scheduler(num_blocks=40, page_size=4, max_num_batched_tokens=24)
    requests = [Request(f"q{i}", [rng.randrange(2, 9) for _ in range(rng.randint(1, 40))],
                        SamplingParams(max_tokens=rng.randint(1, 10))) for i in range(200)]
    pending = list(requests)
    done = {}
    runner, in_flight = MockRunner(4), None
    while pending or scheduler.has_unfinished_requests() or in_flight:
        for _ in range(rng.randint(0, 3)):
            if pending:
                scheduler.add_request(pending.pop(0))
        if scheduler.requests and rng.random() < 0.15:  # abort anything: waiting, mid-prefill, decoding
            scheduler.abort(rng.choice(sorted(scheduler.requests)))
        out = scheduler.schedule()
        step = (out, runner.execute(out))
        if async_scheduling:
            step, in_flight = in_flight, (step if not out.is_empty else None)
            if step is None:
                continue
        live = dict(scheduler.requests)
        for u in scheduler.update(*step).finished:
            done[u.request_id] = live[u.request_id]
    assert_no_pages_held(scheduler)
    assert len(done) > 50
    for r in done.values():
        assert r.output_token_ids == expected_output(r.prompt_token_ids, r.sampling_params.max_tokens)


def test_data_parallel_hit_rate_is_weighted_by_tokens():
    """Two replicas, one with a 1-of-4 hit, one with no lookups: the rate is hits / looked-up
    tokens over both, not the mean of the replicas' rates."""
    from jaxinfer.data_parallel import DataParallelScheduler

    kvs = [KVCacheManager(num_blocks=16, page_size=4) for _ in range(2)]
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    dp = DataParallelScheduler(config, kvs, eos_token_ids=[EOS])
    kvs[0].prefix_cache_queries, kvs[0].prefix_cache_hits = 16, 4
    kvs[1].prefix_cache_queries, kvs[1].prefix_cache_hits = 48, 0
    assert dp.stats()["prefix_cache_hit_rate"] == 4 / 64
