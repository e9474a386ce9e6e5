"""Who owns what under tensor parallelism: a pure function of (model shape, rank, world size).

Attention is split by KV-head group (a group's query heads stay with its KV head), so attention
needs no communication; groups that do not divide evenly go to the lower ranks first (SmolLM2's
3 groups over 2 ranks: 2 + 1), which keeps every rank's KV cache and the o_proj rows it reads
consistent. The MLP's intermediate columns and the LM head's vocabulary rows split the same way.
A rank without a KV group would need replicated KV heads (vLLM's answer when tp > kv heads);
that is refused rather than half-supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.models.config import ModelConfig


def split(total: int, world: int, rank: int) -> range:
    """Rank `rank`'s contiguous share of `total` items, lower ranks taking the remainder."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    kv_heads: range  # this rank's KV heads (and their query-head groups)
    q_heads: range
    intermediate: range  # MLP columns
    vocab: range  # LM-head rows; padded_vocab / world each, the last rank's tail padding
    padded_vocab: int  # vocab rounded up to a multiple of world (all-gather needs equal parts)


def plan(cfg: ModelConfig, rank: int, world: int) -> Shard:
    """The share of `rank`; ValueError naming the limit when the model cannot be split `world`
    ways."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for tensor parallel size {world}")
    if cfg.architecture != "llama":
        raise ValueError(f"tensor parallelism supports Llama-architecture models; "
                         f"{cfg.name} is {cfg.architecture}")
    if world > cfg.num_kv_heads:
        raise ValueError(f"--tensor-parallel-size {world} exceeds {cfg.name}'s "
                         f"{cfg.num_kv_heads} KV heads (each rank needs a whole KV-head group; "
                         f"replicating KV heads is not supported)")
    group = cfg.num_heads // cfg.num_kv_heads
    kv = split(cfg.num_kv_heads, world, rank)
    per_rank = -(-cfg.vocab_size // world)
    return Shard(rank, world, kv, range(kv.start * group, kv.stop * group),
                 split(cfg.intermediate_size, world, rank),
                 range(rank * per_rank, (rank + 1) * per_rank), per_rank * world)


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """`cfg` as this rank's layers see it: its own heads (its KV cache is built from this)."""
    from dataclasses import replace

    return replace(cfg, num_heads=len(shard.q_heads), num_kv_heads=len(shard.kv_heads),
                   intermediate_size=len(shard.intermediate))
