"""The page pool: fixed-size KV pages with ref counts, an LRU free queue and a prefix-cache map.

    free queue (LRU first)   head -> [p7] <-> [p3] <-> [p9] <-> ... <- tail (freed most recently)
    cached map               hash(parent, tokens) -> page    (full pages only)

A page whose ref count drops to 0 goes to the tail of the free queue but keeps its hash and its
place in the cached map, so a later request with the same prefix can take it back (`touch`). New
pages are taken from the head: the least recently freed page is evicted first, and only then does
it lose its hash. Page 0 is never handed out: it is the null page that padding slots point at.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

NULL_BLOCK_ID = 0


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of a full page: chained from its parent page's hash, so equal hashes mean equal prefixes.

    Python's hash of a tuple of ints is deterministic across processes (no hash randomization for
    ints), 64-bit, and fast; the chain makes a collision need two different prefixes with equal
    hashes at every page.
    """
    return hash((parent_hash, tuple(token_ids)))


@dataclasses.dataclass(eq=False)
class KVCacheBlock:
    """One page of the KV cache."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the page is full and registered in the prefix cache
    prev_free: "KVCacheBlock | None" = dataclasses.field(default=None, repr=False)
    next_free: "KVCacheBlock | None" = dataclasses.field(default=None, repr=False)
    in_free_queue: bool = False


class FreeBlockQueue:
    """Doubly linked list of free pages: O(1) pop from the head, append, and removal anywhere."""

    def __init__(self, blocks: Iterable[KVCacheBlock]):
        self._head: KVCacheBlock | None = None
        self._tail: KVCacheBlock | None = None
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVCacheBlock) -> None:
        assert not block.in_free_queue, f"page {block.block_id} is already free"
        block.prev_free, block.next_free = self._tail, None
        if self._tail is None:
            self._head = block
        else:
            self._tail.next_free = block
        self._tail = block
        block.in_free_queue = True
        self.num_free_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        assert block.in_free_queue, f"page {block.block_id} is not free"
        if block.prev_free is None:
            self._head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self._tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_free_blocks -= 1

    def popleft(self) -> KVCacheBlock:
        if self._head is None:
            raise RuntimeError("no free KV pages")
        block = self._head
        self.remove(block)
        return block

    def __iter__(self):
        block = self._head
        while block is not None:
            yield block
            block = block.next_free


class BlockPool:
    """All pages of the KV cache.

    Args:
      num_blocks: pages in the pool, including the null page 0 (so num_blocks - 1 are usable).
      enable_caching: keep full pages in the prefix cache after release.
    """

    def __init__(self, num_blocks: int, *, enable_caching: bool = True, num_stripes: int = 1):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is the null page), got {num_blocks}")
        if num_stripes < 1 or num_blocks % num_stripes:
            raise ValueError(f"{num_blocks} pages do not split into {num_stripes} equal stripes")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Stripes (sequence parallelism): pages [s * size, (s + 1) * size) live on device s of the
        # `seq` axis, and a sequence's page j comes from stripe j % num_stripes, so a long
        # sequence's KV spreads evenly. One stripe: a single LRU free queue.
        self.stripe_size = num_blocks // num_stripes
        self.free_queues = [FreeBlockQueue(self.blocks[max(1, i * self.stripe_size):(i + 1) * self.stripe_size])
                            for i in range(num_stripes)]  # page 0 is the null page
        self.cached: dict[int, KVCacheBlock] = {}

    def _queue(self, block: KVCacheBlock) -> FreeBlockQueue:
        return self.free_queues[block.block_id // self.stripe_size]

    @property
    def num_free_blocks(self) -> int:
        """Pages that can be handed out now (free, cached-free included)."""
        return sum(q.num_free_blocks for q in self.free_queues)

    def can_allocate(self, num_blocks: int, first_index: int = 0, reclaimed: Iterable[KVCacheBlock] = ()) -> bool:
        """Whether `num_blocks` new pages for a sequence's pages first_index.. fit, after taking the
        cached-free pages `reclaimed` (prefix hits) off the free queues."""
        need = [0] * len(self.free_queues)
        for i in range(num_blocks):
            need[(first_index + i) % len(need)] += 1
        for block in reclaimed:
            need[block.block_id // self.stripe_size] += 1
        return all(n <= q.num_free_blocks for n, q in zip(need, self.free_queues))

    @property
    def num_cached_blocks(self) -> int:
        """Pages registered in the prefix cache (held or free)."""
        return len(self.cached)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by requests."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on prefix-cache hits (a cached-free page leaves the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._queue(block).remove(block)
            block.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int, first_index: int = 0) -> list[KVCacheBlock]:
        """Pops `num_blocks` pages (a sequence's pages first_index..), least recently freed first,
        evicting their cached hashes."""
        if not self.can_allocate(num_blocks, first_index):
            raise RuntimeError(f"asked for {num_blocks} KV pages, {self.num_free_blocks} are free")
        out = []
        for i in range(num_blocks):
            block = self.free_queues[(first_index + i) % len(self.free_queues)].popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def cache_full_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Registers a page that just became full under its chained hash."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)  # an equal page already cached stays the one found

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference from each page; pages reaching 0 join the free queue's tail in the
        order given (callers pass a request's pages last-first, so its tail is evicted first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"page {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self._queue(block).append(block)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; only possible when no request holds a page."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
