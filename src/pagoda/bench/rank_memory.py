"""What each rank of a tensor x pipeline parallel deployment holds: its weights and its KV cache.

The shares are the engine's own (`pagoda.parallel.partition.plan` for tensor parallelism,
`pagoda.parallel.pipeline.stage_layers` for the stages), so the plan cannot drift from what the
ranks load:
- a stage holds its contiguous layers; stage 0 also holds the embedding and the LM head (later
  stages drop them);
- under tensor parallelism a rank holds its KV heads' share of q/k/v (a replicated KV head when
  there are more ranks than KV heads), the matching o_proj columns, its MLP columns of
  gate/up/down and, on stage 0, its slice of the LM head's vocabulary (a slice of its own even
  when the embedding is tied) beside the replicated embedding;
- norms (1-D, kept in fp32) go with their layers; every stage keeps the final norm.
Every rank caches only its own KV heads of its own layers, but the one scheduler hands out the
same block ids on every rank: the deployment has as many blocks as its fullest rank can hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagoda.bench.capacity import INT4_GROUP, kv_bytes_per_token_per_layer, tensor_bytes
from pagoda.bench.model_shape import ModelShape
from pagoda.models.config import ModelConfig


@dataclass(frozen=True)
class RankMemory:
    rank: int  # stage * tp + tp_rank, as the engine numbers them
    stage: int
    tp_rank: int
    layers: range
    q_heads: int
    kv_heads: int
    intermediate: int  # MLP columns
    lm_head_rows: int  # 0 off stage 0 (and on stage 0 of a tied single-rank model: the embedding)
    weight_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True)
class DeploymentMemory:
    ranks: tuple[RankMemory, ...]
    num_blocks: int  # the same on every rank: what the fullest rank holds
    limiting_rank: int
    max_requests: int


def model_config(shape: ModelShape) -> ModelConfig:
    """The fields of `shape` that partitioning reads, as the engine's config type."""
    if not shape.intermediate_size or not shape.vocab_size:
        raise ValueError(f"{shape.source} does not record its MLP width and vocabulary size: "
                         f"its split over ranks cannot be planned")
    from pagoda.loader.hf_loader import HF_ARCHITECTURES

    # a GGUF names the engine's architecture itself; a config.json, its class (as the loader maps)
    return ModelConfig(
        architecture=HF_ARCHITECTURES.get(shape.architecture, shape.architecture),
        name=shape.name, vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, max_model_len=shape.context_length,
        tie_word_embeddings=shape.tied_embeddings,
    )  # fmt: skip


def rank_memory(shape: ModelShape, tp: int, pp: int, weights_dtype: str, kv_dtype: str,
                scale_bytes: int = 4, int4_group: int = INT4_GROUP) -> list[RankMemory]:
    """Every rank's share; ValueError (the engine's own message) for a split it would refuse."""
    from pagoda.parallel.partition import plan
    from pagoda.parallel.pipeline import stage_layers

    if tp < 1 or pp < 1:
        raise ValueError("tensor and pipeline parallel sizes must be at least 1")
    cfg = model_config(shape)
    hidden, hd, vhd = shape.hidden_size, shape.head_dim, shape.value_head_dim
    # 1-D tensors: the final norm (hidden) on every stage (keep_stage keeps it), the rest per layer
    layer_vectors = (sum(math.prod(d) for d in shape.weight_shapes if len(d) < 2)
                     - hidden) // shape.num_layers  # fmt: skip
    per_layer_kv = kv_bytes_per_token_per_layer(shape, kv_dtype, scale_bytes)
    ranks = []
    for stage in range(pp):
        layers = stage_layers(cfg, stage, pp)
        for tp_rank in range(tp):
            shard = plan(cfg, tp_rank, tp)
            q, kv, inter = len(shard.q_heads), len(shard.kv_heads), len(shard.intermediate)
            matrices = [((q + kv) * hd + kv * vhd, hidden), (hidden, q * vhd),
                        (2 * inter, hidden), (hidden, inter)] * len(layers)
            lm_rows = 0
            if stage == 0:
                matrices.append((shape.vocab_size, hidden))  # the embedding, on every tp rank
                lm_rows = len(shard.vocab) if tp > 1 else (
                    0 if shape.tied_embeddings else shape.vocab_size)
                if lm_rows:
                    matrices.append((lm_rows, hidden))
            weights = sum(tensor_bytes(d, weights_dtype, int4_group) for d in matrices)
            weights += 4 * (layer_vectors * len(layers) + hidden)
            kv_per_token = len(layers) * per_layer_kv * kv // shape.num_kv_heads
            ranks.append(RankMemory(stage * tp + tp_rank, stage, tp_rank, layers, q, kv, inter,
                                    lm_rows, weights, kv_per_token))
    return ranks


def plan_deployment_memory(ranks: list[RankMemory], memory_bytes: int, context: int,
                           block_size: int, reserve_bytes: int = 0) -> DeploymentMemory:
    """Blocks and concurrent requests when every rank has `memory_bytes` of its own."""
    if context < 1 or block_size < 1:
        raise ValueError("context and block size must be positive")
    blocks = []
    for r in ranks:
        room = memory_bytes - r.weight_bytes - reserve_bytes
        if room <= 0:
            raise ValueError(f"rank {r.rank}'s weights ({r.weight_bytes:,} bytes) and the "
                             f"reserve do not fit in the memory given")
        blocks.append(room // (block_size * r.kv_bytes_per_token))
    fewest = min(range(len(ranks)), key=blocks.__getitem__)
    return DeploymentMemory(tuple(ranks), blocks[fewest], ranks[fewest].rank,
                            blocks[fewest] // math.ceil(context / block_size))


def format_rank_memory(shape: ModelShape, tp: int, pp: int, weights_dtype: str,
                       kv_dtypes: list[str], memory_bytes: int, context: int, block_size: int,
                       scale_bytes: int, reserve_bytes: int) -> str:
    mib = 2**20
    ranks = rank_memory(shape, tp, pp, weights_dtype, kv_dtypes[0], scale_bytes)
    lines = [
        f"per rank, TP {tp} x PP {pp} ({len(ranks)} ranks, {memory_bytes / mib:,.1f} MiB each),"
        f" {weights_dtype} weights, KV bytes per token in {kv_dtypes[0]}:",
        "  rank stage tp  layers  q/kv heads  MLP cols  LM-head rows  weights MiB  KV B/token",
    ]
    for r in ranks:
        span = f"{r.layers.start}-{r.layers.stop - 1}"
        lines.append(
            f"  {r.rank:>4} {r.stage:>5} {r.tp_rank:>2}  {span:>6}  {r.q_heads:>4}/{r.kv_heads:<5}"
            f"  {r.intermediate:>8}  {r.lm_head_rows:>12,}  {r.weight_bytes / mib:>11,.1f}"
            f"  {r.kv_bytes_per_token:>10,}"
        )
    for dtype in kv_dtypes:
        try:
            plan = plan_deployment_memory(
                rank_memory(shape, tp, pp, weights_dtype, dtype, scale_bytes), memory_bytes,
                context, block_size, reserve_bytes)
        except ValueError as e:  # a rank's weights do not fit: say which, per KV dtype
            lines.append(f"  kv {dtype:<5} {e}")
            continue
        lines.append(
            f"  kv {dtype:<5} {plan.num_blocks:,} blocks on every rank (rank {plan.limiting_rank}"
            f" holds the fewest) -> max concurrent requests {plan.max_requests:,} at context"
            f" {context}"
        )
    return "\n".join(lines)
