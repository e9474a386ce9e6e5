"""KV groups for models that mix sliding-window and full-attention layers (Gemma 3).

Each group has its own block pool and block table per request; a layer reads the group it
belongs to. In the sliding group, blocks that lie wholly behind every future query's window are
released while the request runs (their table entries become -1), so that group's memory per
request stays bounded by the window instead of growing with the sequence.

Prefix caching is off for hybrid models: a cached full-attention prefix would need the sliding
layers' K/V of the same tokens, which were released.
"""

from __future__ import annotations

from pagoda.kv_cache.kv_cache_manager import KVCacheManager


class SlidingWindowKVCacheManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, window: int):
        super().__init__(num_blocks, block_size, enable_prefix_caching=False)
        self.window = window

    def commit_computed(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        # Queries from now on sit at positions >= num_computed and see keys at positions
        # > query - window, so block b is dead once
        # (b + 1) * block_size <= num_computed - window + 1.
        table = self.block_tables.get(req_id)
        if table is None:
            return
        num_dead = min(len(table), max(0, (num_computed - self.window + 1) // self.block_size))
        dead = [b for b in table[:num_dead] if b >= 0]
        if dead:
            self.pool.release(dead)
            table[:num_dead] = [-1] * num_dead

    def num_live_blocks(self, req_id: str) -> int:
        return sum(1 for b in self.block_tables.get(req_id, []) if b >= 0)


class HybridKVCacheManager:
    """The scheduler-facing interface of `KVCacheManager`, over several groups at once."""

    def __init__(self, groups: list[KVCacheManager]):
        assert len({g.block_size for g in groups}) == 1
        self.groups = groups
        self.block_size = groups[0].block_size
        self.enable_prefix_caching = False
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def block_tables(self) -> dict[str, list[int]]:
        return self.groups[0].block_tables

    @property
    def num_free_blocks(self) -> int:
        return sum(g.num_free_blocks for g in self.groups)

    @property
    def usage(self) -> float:
        return max(g.usage for g in self.groups)

    def blocks_needed(self, num_tokens: int) -> int:
        return self.groups[0].blocks_needed(num_tokens)

    def find_cached_prefix(self, req_id: str, token_ids: list[int]) -> list[int]:
        return []

    def num_in_flight_tokens(self, req_id: str, num_cached_blocks: int) -> int:
        return 0

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        pass

    def allocate(self, req_id: str, num_total_tokens: int, cached_block_ids: list[int] = ()
                 ) -> bool:
        assert not cached_block_ids
        if not all(g.can_allocate(req_id, num_total_tokens) for g in self.groups):
            return False
        for g in self.groups:
            g.allocate(req_id, num_total_tokens)
        return True

    def block_ids(self, req_id: str) -> list[list[int]]:
        return [list(g.block_tables[req_id]) for g in self.groups]

    def commit_computed(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        for g in self.groups:
            g.commit_computed(req_id, token_ids, num_computed)

    def trim(self, req_id: str, num_tokens: int) -> None:
        for g in self.groups:
            g.trim(req_id, num_tokens)

    def free(self, req_id: str) -> None:
        for g in self.groups:
            g.free(req_id)

    def forget(self, req_id: str) -> None:
        for g in self.groups:
            g.forget(req_id)

    def check_integrity(self) -> None:
        for g in self.groups:
            g.check_integrity()
