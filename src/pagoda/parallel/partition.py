"""Who owns what under tensor parallelism: a pure function of (model shape, rank, world size).

Attention is split by KV-head group (a group's query heads stay with its KV head), so attention
needs no communication; groups that do not divide evenly go to the lower ranks first (SmolLM2's
3 groups over 2 ranks: 2 + 1), which keeps every rank's KV cache and the o_proj rows it reads
consistent. The MLP's intermediate columns and the LM head's vocabulary rows split the same way.

More ranks than KV heads (Gemma 3 270M has one): each KV head is then replicated on
tp / kv_heads ranks, which split its group's query heads (vLLM's answer). Every rank holds one
KV head and caches it; the o_proj all-reduce still sums each query head exactly once. tp must
be a multiple of the KV heads, and a group needs a query head for every replica: anything else
is refused with the reason.
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
    kv_heads: range  # this rank's KV heads (and their query-head groups, or a share of one)
    q_heads: range
    intermediate: range  # MLP columns
    vocab: range  # LM-head rows; padded_vocab / world each, the last rank's tail padding
    padded_vocab: int  # vocab rounded up to a multiple of world (all-gather needs equal parts)


def plan(cfg: ModelConfig, rank: int, world: int) -> Shard:
    """The share of `rank`; ValueError naming the limit when the model cannot be split `world`
    ways."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for tensor parallel size {world}")
    if cfg.architecture not in ("llama", "gemma3"):
        raise ValueError(f"tensor parallelism supports Llama and Gemma 3 models; "
                         f"{cfg.name} is {cfg.architecture}")
    group = cfg.num_heads // cfg.num_kv_heads
    if world <= cfg.num_kv_heads:
        kv = split(cfg.num_kv_heads, world, rank)
        q = range(kv.start * group, kv.stop * group)
    else:  # KV heads replicated, each group's query heads split among its replicas
        replicas, rest = divmod(world, cfg.num_kv_heads)
        if rest or replicas > group:
            raise ValueError(
                f"--tensor-parallel-size {world} does not fit {cfg.name}'s {cfg.num_kv_heads} KV "
                f"heads x {group} query heads each: above the KV heads it must be a multiple of "
                f"them, at most {cfg.num_heads} (one query head per rank)")
        head = rank // replicas
        kv = range(head, head + 1)
        share = split(group, replicas, rank % replicas)
        q = range(head * group + share.start, head * group + share.stop)
    per_rank = -(-cfg.vocab_size // world)
    return Shard(rank, world, kv, q, split(cfg.intermediate_size, world, rank),
                 range(rank * per_rank, (rank + 1) * per_rank), per_rank * world)


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """`cfg` as this rank's layers see it: its own heads (its KV cache is built from this)."""
    from dataclasses import replace

    return replace(cfg, num_heads=len(shard.q_heads), num_kv_heads=len(shard.kv_heads),
                   intermediate_size=len(shard.intermediate))
