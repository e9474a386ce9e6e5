"""A fixed pool of KV blocks with reference counts and an LRU of reusable cached blocks.

Invariants (checked by `check_integrity`):
- every block is either referenced (ref_count > 0) or in the free queue, never both;
- the free queue is ordered least- to most-recently freed; allocation takes from its front, so
  cached contents of recently freed blocks survive longest (LRU eviction);
- `cached` maps a block hash to exactly one block whose `block_hash` is that hash.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is full and findable in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise kv_cache_memory")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks from the front of the free queue, evicting their cached contents."""
        if num > len(self.free_queue):
            raise NoFreeBlocksError(f"need {num} blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(num):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def acquire(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit), reviving free ones."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the free queue.

        Callers pass a request's blocks tail first, so a request's last blocks (least likely to be
        shared) are evicted before its first ones.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} released twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def set_hash(self, block_id: int, block_hash: bytes) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self.cached:
            return  # already findable, or an identical block is (keep the first)
        block.block_hash = block_hash
        self.cached[block_hash] = block_id

    def reset_cache(self) -> None:
        for block_hash, block_id in list(self.cached.items()):
            self.blocks[block_id].block_hash = None
            del self.cached[block_hash]

    def check_integrity(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self.free_queue
            assert block.ref_count >= 0
            assert in_free == (block.ref_count == 0), f"block {block.block_id} free-state mismatch"
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) == block.block_id
        for block_hash, block_id in self.cached.items():
            assert self.blocks[block_id].block_hash == block_hash
