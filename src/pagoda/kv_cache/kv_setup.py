"""Size the KV cache from a memory budget and build its managers and per-layer stores.

Layers are split into KV groups by attention window: one group for full-attention layers and one
for sliding-window layers. A sliding group needs at most a window (plus one step's new tokens)
per running request, so it gets only that much; the rest of the budget goes to the full group.
Models without sliding layers have exactly one group and the plain `KVCacheManager`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kv_cache.hybrid_manager import HybridKVCacheManager, SlidingWindowKVCacheManager
from pagoda.kv_cache.kv_cache_manager import KVCacheManager
from pagoda.kv_cache.kv_store import KVStore, kv_bytes_per_element, make_kv_store
from pagoda.models.config import ModelConfig


@dataclass(frozen=True)
class KVCacheConfig:
    """One KV group: its layers, window, and block pool size."""

    num_blocks: int
    block_size: int
    kv_dtype: str
    bytes_per_block: int  # over all layers of the group
    layers: tuple[int, ...] = ()
    window: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_kv_groups(cfg: ModelConfig, memory: int, block_size: int, kv_dtype: str,
                   max_num_seqs: int, max_num_batched_tokens: int) -> list[KVCacheConfig]:
    per_layer_block = int(cfg.num_kv_heads * cfg.head_dim * 2 * block_size
                          * kv_bytes_per_element(kv_dtype, cfg.head_dim))
    full = tuple(i for i in range(cfg.num_layers) if cfg.window_of(i) is None)
    sliding = tuple(i for i in range(cfg.num_layers) if cfg.window_of(i) is not None)
    groups = []
    remaining = memory
    if sliding:
        window = cfg.sliding_window
        assert window is not None
        bytes_per_block = per_layer_block * len(sliding)
        needed = (max_num_seqs * (-(-window // block_size) + 1)
                  + -(-max_num_batched_tokens // block_size) + 1)
        share = memory * len(sliding) // cfg.num_layers
        num_blocks = min(needed, share // bytes_per_block)
        remaining -= num_blocks * bytes_per_block
        groups.append(KVCacheConfig(num_blocks, block_size, kv_dtype, bytes_per_block, sliding,
                                    window))
    if full:
        bytes_per_block = per_layer_block * len(full)
        groups.insert(0, KVCacheConfig(remaining // bytes_per_block, block_size, kv_dtype,
                                       bytes_per_block, full))
    for g in groups:
        if g.num_blocks < 1:
            raise ValueError(f"kv_cache_memory {memory} holds no KV block of "
                             f"{g.bytes_per_block} bytes")
    return groups


def build_kv(groups: list[KVCacheConfig], cfg: ModelConfig, device: torch.device,
             compute_dtype: torch.dtype, enable_prefix_caching: bool, salt: str,
             layers: range | None = None
             ) -> tuple[KVCacheManager | HybridKVCacheManager, list[KVStore], list[int]]:
    """Returns (manager, one store per layer, KV group index of each layer). `layers`: only
    these layers' stores (a pipeline stage's; same blocks, fewer layers), default all."""
    layers = range(cfg.num_layers) if layers is None else layers
    stores: list[KVStore | None] = [None] * cfg.num_layers
    layer_groups = [0] * cfg.num_layers
    managers: list[KVCacheManager] = []
    for gi, g in enumerate(groups):
        for layer in g.layers:
            layer_groups[layer] = gi
            if layer in layers:
                stores[layer] = make_kv_store(g.kv_dtype, g.num_blocks, g.block_size,
                                              cfg.num_kv_heads, cfg.head_dim, device,
                                              compute_dtype)
        if g.window is None:
            managers.append(KVCacheManager(g.num_blocks, g.block_size,
                                           enable_prefix_caching and len(groups) == 1, salt))
        else:
            managers.append(SlidingWindowKVCacheManager(g.num_blocks, g.block_size, g.window))
    manager = managers[0] if len(managers) == 1 else HybridKVCacheManager(managers)
    return manager, [s for s in stores if s is not None], [layer_groups[i] for i in layers]
