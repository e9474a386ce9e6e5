"""Block pool and KV-cache manager from tiny configs: exact block ids, reuse and eviction order."""

from __future__ import annotations

import pytest

from pagoda.kv_cache.block_pool import BlockPool, NoFreeBlocksError
from pagoda.kv_cache.kv_cache_manager import KVCacheManager, block_hashes


def test_allocate_release_order_and_integrity():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.release([1, 0])  # tail first
    pool.check_integrity()
    assert list(pool.free_queue) == [3, 1, 0]
    assert pool.allocate(3) == [3, 1, 0]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.check_integrity()


def test_double_release_is_caught():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(AssertionError):
        pool.release(ids)


def test_chained_hash_depends_on_prefix_and_salt():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, b"s")
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, b"s")
    c = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, b"t")
    assert len(a) == 2 and a[1] != b[1], "same second block after a different first must differ"
    assert a[0] != c[0], "the salt (model, KV dtype) is part of the hash"
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, b"s", a[:1]) == a  # extends known hashes


def test_prefix_reuse_exact_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4, salt="m")
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.find_cached_prefix("a", prompt) == []
    assert kv.allocate("a", 10)
    assert kv.block_tables["a"] == [0, 1, 2]
    kv.commit_computed("a", prompt, 10)  # blocks 0 and 1 are full -> findable
    # a second request with the same first 9 tokens reuses blocks 0 and 1 while "a" still runs
    other = prompt[:9] + [99, 100]
    assert kv.find_cached_prefix("b", other) == [0, 1]
    assert kv.allocate("b", 11, [0, 1])
    assert kv.block_tables["b"] == [0, 1, 3]
    assert kv.pool.blocks[0].ref_count == 2
    kv.check_integrity()


def test_never_reuses_the_whole_prompt():
    kv = KVCacheManager(num_blocks=4, block_size=4, salt="m")
    prompt = list(range(8))
    kv.allocate("a", 8)
    kv.commit_computed("a", prompt, 8)
    kv.free("a")
    # exactly two full cached blocks, but one token must be computed to get logits
    assert kv.find_cached_prefix("b", prompt) == [0]


def test_lru_eviction_keeps_recent_blocks_findable():
    kv = KVCacheManager(num_blocks=4, block_size=2, salt="m")
    p1, p2 = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    kv.allocate("a", 5)
    kv.commit_computed("a", p1, 5)  # blocks 0,1 cached
    kv.free("a")  # a held 0, 1, 2 (2 partial); free queue: 3, 2, 1, 0 (a's tail first)
    kv.allocate("b", 4)  # takes 3, 2
    assert kv.block_tables["b"] == [3, 2]
    kv.commit_computed("b", p2, 4)
    kv.free("b")  # free queue: 1, 0, 2, 3
    assert list(kv.pool.free_queue) == [1, 0, 2, 3]
    kv.allocate("c", 2)  # evicts block 1 (least recently freed, a's second block)
    assert kv.block_tables["c"] == [1]
    assert kv.find_cached_prefix("d", p1) == [0]  # block 0 survived, block 1 was evicted
    assert kv.find_cached_prefix("e", p2 + [11]) == [3, 2]
    kv.check_integrity()


def test_disabled_prefix_caching_finds_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    kv.allocate("a", 5)
    kv.commit_computed("a", [1, 2, 3, 4, 5], 5)
    kv.free("a")
    assert kv.find_cached_prefix("b", [1, 2, 3, 4, 5]) == []


def test_allocate_fails_cleanly_when_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert kv.allocate("a", 8)
    assert not kv.allocate("b", 1)
    assert "b" not in kv.block_tables
    kv.check_integrity()
