"""Per-request KV pages on top of the BlockPool, with prefix-cache lookups.

A request's pages hold its tokens in order: token t lives in page `pages[t // page_size]`, slot
`t % page_size`. The scheduler asks three things of this class:

    get_computed_blocks(request)      prefix-cache hits for a new request (full pages only)
    allocate_slots(request, n, hits)  pages for n more tokens, or None when the pool is short
    free(request)                     drop the request's references (finished, aborted, preempted)
    fork(assignments)                 beam search: requests take other requests' pages (shared full
                                      pages, the last partial page copied unless a fork can own it)

A full page is registered in the prefix cache only after the step that computes it has been
scheduled and dispatched (at the request's next allocation or at free), never in the step that
writes it: a request that hits it runs in a later step, which the device executes after the one
writing it (steps run in order, also with async scheduling, where that step may still be running).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from jaxinfer.cache.block_pool import BlockPool, KVCacheBlock, hash_block_tokens


class CacheRequest(Protocol):
    """What the manager reads from a request."""

    request_id: str
    num_computed_tokens: int  # tokens whose KV is in the cache

    @property
    def all_token_ids(self) -> Sequence[int]: ...  # prompt + generated so far


class KVCacheManager:
    """Pages per request, prefix caching, and usage statistics.

    Args:
      num_blocks: pages in the pool (page 0 is the null page).
      page_size: tokens per page.
      enable_prefix_caching: reuse full pages across requests.
    """

    def __init__(self, *, num_blocks: int, page_size: int, enable_prefix_caching: bool = True,
                 num_stripes: int = 1):
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching, num_stripes=num_stripes)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._req_to_hashes: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found cached

    # ---- queries ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ---- prefix cache -------------------------------------------------------------------------

    def _block_hashes(self, request: CacheRequest) -> list[int]:
        """Chained hashes of the request's full pages, extended as its tokens grow."""
        hashes = self._req_to_hashes.setdefault(request.request_id, [])
        tokens, page = request.all_token_ids, self.page_size
        while (len(hashes) + 1) * page <= len(tokens):
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * page:(i + 1) * page]))
        return hashes

    def get_computed_blocks(self, request: CacheRequest) -> tuple[list[KVCacheBlock], int]:
        """Cached pages matching the start of a new request, and the tokens they cover.

        The last prompt token is always left to compute (its logits start the generation), so a
        prompt that is entirely cached still runs one token.
        """
        if not self._looks_up_prefix(request):
            return [], 0
        num_tokens = len(request.all_token_ids)
        max_pages = (num_tokens - 1) // self.page_size
        hits: list[KVCacheBlock] = []
        for block_hash in self._block_hashes(request)[:max_pages]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.page_size

    def _cache_computed_pages(self, request: CacheRequest, num_computed_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        # only pages whose tokens are known (a step in flight may have filled one with a pending token)
        num_full = min(min(num_computed_tokens, len(request.all_token_ids)) // self.page_size, len(blocks))
        start = self._num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache_full_block(blocks[i], hashes[i])
        self._num_cached_blocks[rid] = num_full

    # ---- allocation ---------------------------------------------------------------------------

    def allocate_slots(self, request: CacheRequest, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = ()) -> list[KVCacheBlock] | None:
        """Pages for `num_new_tokens` tokens after the computed ones, or None if the pool is short.

        Args:
          request: the request; `num_computed_tokens` does not yet count `new_computed_blocks`.
          num_new_tokens: tokens to be computed in this step.
          new_computed_blocks: prefix-cache hits from `get_computed_blocks` (first allocation only).

        Returns:
          The newly allocated pages (possibly empty), or None with nothing changed.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.page_size
        num_required = self.num_blocks_for(num_computed + num_new_tokens)
        num_new = max(0, num_required - len(blocks) - len(new_computed_blocks))
        # A hit on a cached-free page takes it off the free queue: it costs a free page too.
        first_new = len(blocks) + len(new_computed_blocks)  # the sequence's index of the first new page
        if not self.pool.can_allocate(num_new, first_new, [b for b in new_computed_blocks if b.ref_cnt == 0]):
            return None
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new, first_new)
        if rid not in self.req_to_blocks:
            self._count_prefix_lookup(request, len(new_computed_blocks))
        blocks = self.req_to_blocks.setdefault(rid, [])
        blocks.extend(new_computed_blocks)
        blocks.extend(new_blocks)
        if new_computed_blocks:
            self._num_cached_blocks[rid] = len(blocks) - len(new_blocks)
        self._cache_computed_pages(request, num_computed)
        return new_blocks

    def _looks_up_prefix(self, request: CacheRequest) -> bool:
        """Whether a request's start is looked up in the prefix cache: a new one (nothing computed),
        unless it asks to skip it (e.g. prompt logprobs need every token computed)."""
        return (self.enable_prefix_caching and not request.num_computed_tokens
                and not getattr(request, "skip_prefix_cache", False))

    def _count_prefix_lookup(self, request: CacheRequest, num_hit_pages: int) -> None:
        """Counted once per admission, when its first allocation succeeds: a request that waits for
        pages looks its prefix up again every step, and those retries are not new queries."""
        if self._looks_up_prefix(request):
            self.prefix_cache_queries += len(request.all_token_ids)
            self.prefix_cache_hits += num_hit_pages * self.page_size

    def fork(self, assignments: Sequence[tuple[str, str, int]]) -> list[tuple[int, int]] | None:
        """Requests take other requests' pages, all at once (beam search's re-parenting).

        Args:
          assignments: (child id, parent id, tokens the parent has computed): the child drops its own
            pages and continues from the parent's first `tokens` tokens. A parent is the child of one
            assignment at most; parents that are no child keep their pages.

        Full pages are shared (one more reference each); the page holding the last `tokens % page`
        tokens is handed to the first child that asks for it and copied into a new page for every
        other one (the next token is written into that page: it cannot be shared).

        Returns:
          (source page, new page) copies for the device to make before the next step writes, or
          None with nothing changed when the pool cannot supply the copies.
        """
        page = self.page_size
        old = {child: self.req_to_blocks.get(child, []) for child, _, _ in assignments}
        old.update({parent: self.req_to_blocks.get(parent, []) for _, parent, _ in assignments})
        hashes = {parent: list(self._req_to_hashes.get(parent, ())) for _, parent, _ in assignments}
        cached = {parent: self._num_cached_blocks.get(parent, 0) for _, parent, _ in assignments}
        plans, owned, copies_at = [], set(), []
        for child, parent, tokens in assignments:
            full, partial = divmod(tokens, page)
            blocks = old[parent]
            if len(blocks) < full + bool(partial):
                raise ValueError(f"request {parent!r} holds {len(blocks)} pages, fewer than its {tokens} tokens need")
            last = blocks[full] if partial else None
            copy = last is not None and last.block_id in owned
            if last is not None:
                owned.add(last.block_id)
            if copy:
                copies_at.append(full)
            plans.append((child, parent, blocks[:full], last, copy, full))
        stripes = len(self.pool.free_queues)
        need = [sum(1 for i in copies_at if i % stripes == s) for s in range(stripes)]
        if any(n > q.num_free_blocks for n, q in zip(need, self.pool.free_queues)):
            return None
        copies, new = [], {}
        for child, parent, shared, last, copy, index in plans:
            self.pool.touch(shared)
            blocks = list(shared)
            if copy:
                fresh = self.pool.get_new_blocks(1, index)[0]
                copies.append((last.block_id, fresh.block_id))
                blocks.append(fresh)
            elif last is not None:
                self.pool.touch([last])
                blocks.append(last)
            new[child] = (blocks, hashes[parent][:len(shared)], min(cached[parent], len(shared)))
        for child, _, _ in assignments:
            self.pool.free_blocks(reversed(old[child]))
        for child, (blocks, child_hashes, num_cached) in new.items():
            self.req_to_blocks[child] = blocks
            self._req_to_hashes[child] = child_hashes
            self._num_cached_blocks[child] = num_cached
        return copies

    def free(self, request: CacheRequest) -> None:
        """Releases the request's pages (its full computed pages stay in the prefix cache)."""
        rid = request.request_id
        self._cache_computed_pages(request, request.num_computed_tokens)
        blocks = self.req_to_blocks.pop(rid, [])
        self.pool.free_blocks(reversed(blocks))  # tail pages first in line for eviction
        self._req_to_hashes.pop(rid, None)
        self._num_cached_blocks.pop(rid, None)
