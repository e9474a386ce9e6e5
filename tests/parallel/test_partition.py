"""Who owns which heads, columns and vocabulary rows: every item owned exactly once, KV groups
kept whole, and what cannot be split refused with the limit named."""

from __future__ import annotations

import dataclasses

import pytest

from pagoda.models.config import ModelConfig
from pagoda.parallel.partition import local_config, plan, split

SMOLLM2 = ModelConfig(architecture="llama", name="smollm2", vocab_size=49152, hidden_size=576,
                      intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                      head_dim=64, max_model_len=8192)


@pytest.mark.parametrize("total,world", [(3, 2), (3, 3), (1536, 2), (10, 4), (7, 7)])
def test_split_covers_everything_once_lower_ranks_first(total, world):
    parts = [split(total, world, r) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(total))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_smollm2_shards_keep_kv_groups_whole(world):
    shards = [plan(SMOLLM2, r, world) for r in range(world)]
    assert [h for s in shards for h in s.kv_heads] == [0, 1, 2]
    for s in shards:  # each KV head's 3 query heads travel with it
        assert list(s.q_heads) == [q for kv in s.kv_heads for q in range(3 * kv, 3 * kv + 3)]
        local = local_config(SMOLLM2, s)
        assert local.num_heads == 3 * local.num_kv_heads
    assert sum(len(s.intermediate) for s in shards) == 1536
    assert all(len(s.vocab) * world == s.padded_vocab for s in shards)


def test_uneven_vocabulary_is_padded_to_equal_slices():
    cfg = dataclasses.replace(SMOLLM2, vocab_size=49153)
    shards = [plan(cfg, r, 2) for r in range(2)]
    assert shards[0].padded_vocab == 49154 and len(shards[1].vocab) == 24577
    assert shards[1].vocab.stop == 49154


GEMMA3 = dataclasses.replace(SMOLLM2, architecture="gemma3", name="gemma3-270m", num_heads=4,
                             num_kv_heads=1, head_dim=256, hidden_size=640)


@pytest.mark.parametrize("cfg,world", [(SMOLLM2, 6), (SMOLLM2, 9), (GEMMA3, 2), (GEMMA3, 4)])
def test_more_ranks_than_kv_heads_replicate_them_and_split_their_query_heads(cfg, world):
    shards = [plan(cfg, r, world) for r in range(world)]
    # every query head computed exactly once (the o_proj all-reduce sums each once) ...
    assert [q for s in shards for q in s.q_heads] == list(range(cfg.num_heads))
    group = cfg.num_heads // cfg.num_kv_heads
    for s in shards:  # ... next to the one KV head of its group, which this rank caches
        assert len(s.kv_heads) == 1 and s.q_heads
        assert all(q // group == s.kv_heads[0] for q in s.q_heads)
        assert local_config(cfg, s).num_kv_heads == 1
    replicas = world // cfg.num_kv_heads
    assert [s.kv_heads[0] for s in shards] == [r // replicas for r in range(world)]


@pytest.mark.parametrize("cfg,world,limit", [(SMOLLM2, 4, "multiple of them"),
                                              (SMOLLM2, 12, "at most 9"),
                                              (GEMMA3, 5, "at most 4")])
def test_what_replication_cannot_split_is_refused(cfg, world, limit):
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {world} does not fit .*{limit}"):
        plan(cfg, 0, world)


def test_other_architectures_are_refused():
    bert = dataclasses.replace(SMOLLM2, architecture="bert", name="minilm")
    with pytest.raises(ValueError, match="supports Llama and Gemma 3 models; minilm is bert"):
        plan(bert, 0, 2)
