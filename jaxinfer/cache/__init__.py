"""KV-cache memory bookkeeping on the host: pages, ref counts, prefix cache. No jax import.

    KVCacheManager (per-request page lists, prefix-cache lookups)
        -> BlockPool (pages, ref counts, LRU free queue, hash -> cached page)
"""

from jaxinfer.cache.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens
from jaxinfer.cache.manager import KVCacheManager

__all__ = ["BlockPool", "FreeBlockQueue", "KVCacheBlock", "KVCacheManager", "NULL_BLOCK_ID", "hash_block_tokens"]
