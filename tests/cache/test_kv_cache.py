"""Host-side KV-cache bookkeeping (block pool, manager, prefix cache), tested without jax."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest

from jaxinfer.cache import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock, KVCacheManager, hash_block_tokens


@dataclasses.dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


def make_request(rid: str, num_tokens: int, start: int = 0) -> FakeRequest:
    return FakeRequest(rid, list(range(start, start + num_tokens)))


def assert_all_free(manager: KVCacheManager) -> None:
    pool = manager.pool
    assert pool.num_free_blocks == pool.num_blocks - 1
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert not manager.req_to_blocks


def test_cache_package_does_not_import_jax():
    code = "import sys, jaxinfer.cache; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_free_queue_order_and_removal():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4] and q.num_free_blocks == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 4, 2]
    with pytest.raises(AssertionError):
        q.append(blocks[3])


def test_pool_never_hands_out_the_null_page_and_reports_exhaustion():
    pool = BlockPool(5)
    got = pool.get_new_blocks(4)
    assert NULL_BLOCK_ID not in [b.block_id for b in got] and pool.num_free_blocks == 0
    assert pool.usage == 1.0
    with pytest.raises(RuntimeError, match="asked for 1 KV pages, 0 are free"):
        pool.get_new_blocks(1)
    pool.free_blocks(got)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(ValueError, match="at least 2 pages"):
        BlockPool(1)


def test_freed_pages_are_reused_least_recently_freed_first():
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([b])
    pool.free_blocks([a])
    pool.free_blocks([c])
    assert [x.block_id for x in pool.get_new_blocks(3)] == [b.block_id, a.block_id, c.block_id]


def test_cached_page_survives_release_until_evicted():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_full_block(a, h)
    pool.free_blocks([a])
    assert pool.get_cached_block(h) is a and pool.num_free_blocks == 1
    pool.touch([a])  # a hit takes the page back from the free queue
    assert a.ref_cnt == 1 and pool.num_free_blocks == 0
    pool.free_blocks([a, b])
    pool.get_new_blocks(2)  # evicts both
    assert pool.get_cached_block(h) is None and a.block_hash is None


def test_hashes_chain_the_prefix():
    h1 = hash_block_tokens(None, [1, 2, 3])
    assert hash_block_tokens(h1, [4, 5, 6]) != hash_block_tokens(hash_block_tokens(None, [9, 2, 3]), [4, 5, 6])
    assert hash_block_tokens(h1, [4, 5, 6]) == hash_block_tokens(hash_block_tokens(None, [1, 2, 3]), [4, 5, 6])


def test_allocation_grows_with_the_sequence():
    m = KVCacheManager(num_blocks=10, page_size=4)
    r = make_request("a", 10)
    assert len(m.allocate_slots(r, 10)) == 3
    r.num_computed_tokens = 10
    for token in range(10, 13):  # decode: tokens 10, 11 fit page 2; token 12 needs page 3
        r.output_token_ids.append(token)
        new = m.allocate_slots(r, 1)
        assert len(new) == (1 if token == 12 else 0)
        r.num_computed_tokens += 1
    assert len(m.get_block_ids("a")) == 4
    m.free(r)
    assert_all_free(m)


def test_failed_allocation_changes_nothing():
    m = KVCacheManager(num_blocks=4, page_size=4)  # 3 usable pages
    a = make_request("a", 8)
    assert m.allocate_slots(a, 8) is not None
    b = make_request("b", 8, start=100)
    assert m.allocate_slots(b, 8) is None
    assert m.num_free_blocks == 1 and "b" not in m.req_to_blocks
    assert len(m.allocate_slots(b, 4)) == 1  # a chunk that fits


def test_prefix_cache_reuses_full_computed_pages():
    m = KVCacheManager(num_blocks=20, page_size=4)
    a = make_request("a", 14)
    assert m.get_computed_blocks(a) == ([], 0)
    m.allocate_slots(a, 14)
    a.num_computed_tokens = 14
    m.free(a)  # 3 full pages registered, kept as cached-free
    assert m.num_free_blocks == 19

    b = FakeRequest("b", list(range(12)) + [99, 98, 97])  # shares 3 pages
    hits, num_cached = m.get_computed_blocks(b)
    assert num_cached == 12 and len(hits) == 3
    new = m.allocate_slots(b, 15 - 12, hits)
    assert len(new) == 1 and m.get_block_ids("b")[:3] == [x.block_id for x in hits]
    assert all(x.ref_cnt == 1 for x in hits)
    assert m.prefix_cache_hits == 12


def test_fully_cached_prompt_still_computes_its_last_token():
    m = KVCacheManager(num_blocks=20, page_size=4)
    a = make_request("a", 8)
    m.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    m.free(a)
    hits, num_cached = m.get_computed_blocks(make_request("b", 8))
    assert num_cached == 4 and len(hits) == 1


def test_pages_are_not_shared_before_they_are_computed():
    m = KVCacheManager(num_blocks=20, page_size=4)
    a = make_request("a", 12)
    m.allocate_slots(a, 12)  # scheduled, not yet computed
    assert m.get_computed_blocks(make_request("b", 12)) == ([], 0)
    a.num_computed_tokens = 12
    m.allocate_slots(a, 0)  # the next allocation registers the computed pages
    assert m.get_computed_blocks(make_request("c", 12))[1] == 8


def test_shared_pages_are_freed_only_when_every_holder_is_done():
    m = KVCacheManager(num_blocks=10, page_size=4)
    a = make_request("a", 9)
    m.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    m.allocate_slots(a, 0)
    b = make_request("b", 9)
    hits, n = m.get_computed_blocks(b)
    m.allocate_slots(b, 9 - n, hits)
    shared = hits[0]
    assert shared.ref_cnt == 2
    m.free(a)
    assert shared.ref_cnt == 1 and not shared.in_free_queue
    b.num_computed_tokens = 9
    m.free(b)
    assert_all_free(m)


def test_cached_free_hits_count_against_the_free_budget():
    m = KVCacheManager(num_blocks=4, page_size=4)  # 3 usable
    a = make_request("a", 9)
    m.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    m.free(a)  # 2 cached-free + 1 free
    b = FakeRequest("b", list(range(8)) + list(range(50, 58)))  # 16 tokens: 2 hits + 2 new pages
    hits, n = m.get_computed_blocks(b)
    assert n == 8
    assert m.allocate_slots(b, 8, hits) is None  # needs 2 hits + 2 new > 3 free
    assert all(h.ref_cnt == 0 and h.in_free_queue for h in hits)


def test_a_request_waiting_for_pages_is_counted_once_in_the_hit_rate():
    m = KVCacheManager(num_blocks=6, page_size=4)  # 5 usable
    a, c = make_request("a", 8), make_request("c", 8, start=100)
    for r in (a, c):
        m.allocate_slots(r, 8)
        r.num_computed_tokens = 8
    m.allocate_slots(a, 0)  # a's 2 pages are computed and cached, and a still holds them
    b = FakeRequest("b", list(range(8)) + list(range(50, 62)))  # 20 tokens: 2 hits + 3 new pages
    for _ in range(3):  # 1 page free: b stays waiting, looking its prefix up each step
        hits, n = m.get_computed_blocks(b)
        assert n == 8 and m.allocate_slots(b, 12, hits) is None
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (16, 0)  # a's and c's admissions only
    m.free(c)
    hits, n = m.get_computed_blocks(b)
    assert m.allocate_slots(b, 12, hits) is not None
    m.allocate_slots(b, 0)  # later allocations of an admitted request are not lookups
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (16 + 20, 8)
    assert m.prefix_cache_hit_rate == 8 / 36


def test_randomized_workload_leaks_nothing():
    rng = random.Random(0)
    m = KVCacheManager(num_blocks=40, page_size=4)
    live: dict[str, FakeRequest] = {}
    for step in range(2000):
        action = rng.random()
        if action < 0.3 and len(live) < 12:
            rid = f"r{step}"
            r = FakeRequest(rid, [rng.randrange(5) for _ in range(rng.randint(1, 30))])
            hits, n = m.get_computed_blocks(r)
            chunk = rng.randint(1, len(r.all_token_ids) - n)
            if m.allocate_slots(r, chunk, hits) is not None:
                r.num_computed_tokens = n + chunk
                live[rid] = r
        elif action < 0.8 and live:
            r = live[rng.choice(sorted(live))]
            if r.num_computed_tokens == len(r.all_token_ids):
                r.output_token_ids.append(rng.randrange(5))
            n = len(r.all_token_ids) - r.num_computed_tokens
            if m.allocate_slots(r, n) is not None:
                r.num_computed_tokens += n
            else:  # preempt: drop everything, as the scheduler will
                m.free(live.pop(r.request_id))
        elif live:
            m.free(live.pop(rng.choice(sorted(live))))  # finish or abort, mid-prefill included
        held = {b.block_id for v in m.req_to_blocks.values() for b in v}
        assert m.num_free_blocks + len(held) == 39  # every usable page is free xor held
    for r in list(live.values()):
        m.free(r)
    assert_all_free(m)
    assert m.prefix_cache_hits > 0
