"""Per-request block tables over a `BlockPool`, with automatic prefix caching.

A full block is identified by a chained hash: hash(parent hash, its token ids, a salt naming the
model and KV dtype), so equal hashes mean equal KV contents. A new request reuses the longest run of
cached blocks matching its prompt and computes only the rest.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter

from pagoda.kv_cache.block_pool import BlockPool


def block_hashes(token_ids: list[int], block_size: int, salt: bytes,
                 start: list[bytes] | None = None) -> list[bytes]:
    """Chained hashes of every full block of `token_ids`, extending the already known `start`."""
    hashes = list(start or [])
    parent = hashes[-1] if hashes else salt
    for i in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        chunk = array("q", token_ids[i:i + block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: str = ""):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self.block_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # full-block hashes of each request's tokens
        self._num_cached_blocks: dict[str, int] = {}  # how many of its blocks are registered
        # Hashes of prompt blocks that admitted requests have yet to fill (one count per request):
        # blocks in flight, findable in the cache once their owner's step commits them.
        self._in_flight: Counter[bytes] = Counter()
        self._in_flight_of: dict[str, list[bytes]] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, req_id: str, token_ids: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `token_ids`.

        At least one token is always left to compute: the step that computes it yields the logits
        for the first sampled token.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = block_hashes(token_ids, self.block_size, self.salt, self._hashes.get(req_id))
        self._hashes[req_id] = hashes
        max_blocks = (len(token_ids) - 1) // self.block_size
        hit: list[int] = []
        for h in hashes[:max_blocks]:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def num_in_flight_tokens(self, req_id: str, num_cached_blocks: int) -> int:
        """Tokens right after a request's cached prefix that other admitted requests are computing.

        Call after `find_cached_prefix`. Admitting the request now would compute them a second
        time; a step later they are cache hits.
        """
        hashes = self._hashes.get(req_id, [])
        num = 0
        for h in hashes[num_cached_blocks:]:
            if not self._in_flight[h]:
                break
            num += 1
        return num * self.block_size

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache lookup (tokens queried and found)."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_hit_tokens

    def allocate(self, req_id: str, num_total_tokens: int, cached_block_ids: list[int] = ()
                 ) -> bool:
        """Grow the request's block table to hold `num_total_tokens`; False if blocks are short.

        `cached_block_ids` (a prefix-cache hit) become the head of a new request's table.
        """
        if not self.can_allocate(req_id, num_total_tokens, cached_block_ids):
            return False
        table = self.block_tables.get(req_id, [])
        need = self.blocks_needed(num_total_tokens) - len(table) - len(cached_block_ids)
        if cached_block_ids:
            self.pool.acquire(list(cached_block_ids))
            table = table + list(cached_block_ids)
            self._num_cached_blocks[req_id] = len(table)
        if req_id not in self.block_tables and self.enable_prefix_caching:
            pending = self._hashes.get(req_id, [])[len(table):]
            self._in_flight.update(pending)
            self._in_flight_of[req_id] = pending
        if need > 0:
            table = table + self.pool.allocate(need)
        self.block_tables[req_id] = table
        return True

    def can_allocate(self, req_id: str, num_total_tokens: int, cached_block_ids: list[int] = ()
                     ) -> bool:
        have = len(self.block_tables.get(req_id, [])) + len(cached_block_ids)
        need = self.blocks_needed(num_total_tokens) - have
        revived = sum(1 for b in cached_block_ids if self.pool.blocks[b].ref_count == 0)
        return need + revived <= self.pool.num_free

    def block_ids(self, req_id: str) -> list[list[int]]:
        """The request's block table of each KV group (one group here)."""
        return [list(self.block_tables[req_id])]

    def commit_computed(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register the request's blocks that `num_computed` tokens have filled."""
        if not self.enable_prefix_caching:
            return
        num_full = num_computed // self.block_size
        done = self._num_cached_blocks.get(req_id, 0)
        if num_full <= done:
            return
        hashes = self._hashes.get(req_id, [])
        if len(hashes) < num_full:
            hashes = block_hashes(token_ids[:num_full * self.block_size], self.block_size,
                                  self.salt, hashes)
            self._hashes[req_id] = hashes
        table = self.block_tables[req_id]
        for i in range(done, num_full):
            self.pool.set_hash(table[i], hashes[i])
        self._num_cached_blocks[req_id] = num_full
        pending = self._in_flight_of.get(req_id)
        if pending:
            filled = num_full - done
            self._settle(pending[:filled])
            self._in_flight_of[req_id] = pending[filled:]

    def trim(self, req_id: str, num_tokens: int) -> None:
        """Free the request's blocks past its first `num_tokens` tokens (the slots of rejected
        draft tokens). No hash covers them: hashes are committed for computed tokens only."""
        table = self.block_tables.get(req_id)
        keep = self.blocks_needed(num_tokens)
        if table is None or len(table) <= keep:
            return
        extra = table[keep:]
        del table[keep:]
        self.pool.release([b for b in extra[::-1] if b >= 0])

    def free(self, req_id: str) -> None:
        table = self.block_tables.pop(req_id, [])
        self.pool.release([b for b in table[::-1] if b >= 0])
        self._num_cached_blocks.pop(req_id, None)
        self._settle(self._in_flight_of.pop(req_id, []))

    def _settle(self, hashes: list[bytes]) -> None:
        """These in-flight blocks were filled or abandoned; a hash leaves at count zero."""
        for h in hashes:
            count = self._in_flight[h] - 1
            if count:
                self._in_flight[h] = count
            else:
                del self._in_flight[h]

    def forget(self, req_id: str) -> None:
        """Drop per-request hash state once the request is gone for good."""
        self.free(req_id)
        self._hashes.pop(req_id, None)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for table in self.block_tables.values():
            for b in table:
                if b >= 0:  # -1: released by a sliding window
                    refs[b] += 1
        for block in self.pool.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} != {refs[block.block_id]}")
        expected = Counter(h for pending in self._in_flight_of.values() for h in pending)
        assert self._in_flight == expected, "in-flight block hashes out of step"
