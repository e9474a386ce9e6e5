"""Pipeline parallelism: the decoder layers cut into contiguous stages, one process each, the
hidden states passed around a ring.

Rank 0 (the engine's process) holds the embedding, the first stage, the final norm and the LM
head; ranks 1..M-1 hold only their layers (and their layers' KV cache: the same block ids on
every stage, so the one scheduler's block tables serve them all). A step's batch is cut into
micro-batches (model_runner.micro_batches); rank 0 pushes each through its stage and sends it
on, so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1. The last stage
sends its output back to rank 0, which normalizes and samples. Sends are asynchronous; every
receive waits at most the group's timeout, and a peer that died fails the step with an error.

Without tensor parallelism the engine also keeps `depth` (= stages) scheduler batches in flight,
each one micro-batch of other requests: rank 0 `start`s batch k + 1 through its stage while the
later stages still run batch k, and `finish`es batch k (receives, samples) afterwards, so no stage
waits for a step to end. Every stage runs the batches in the order rank 0 started them, which is
what makes this the same computation as one batch after another. Each batch has its own message
tags (a counter every rank advances per batch), and rank 0 posts its receives when it starts a
batch, so the last stage's sends never wait for rank 0's next step.

Each micro-batch holds whole requests, so a request's rows are computed exactly as in one
process (the batch-invariance the engine already keeps: tests compare token for token).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention_metadata import AttentionMetadata
from pagoda.models.config import ModelConfig
from pagoda.parallel.comm import COLLECTIVE_TIMEOUT, TPGroup
from pagoda.parallel.partition import split

Prepared = tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]  # ids, positions, metas

TAG_CYCLE = 1 << 16  # batches whose tags are distinct (far more than can be in flight)


@dataclass
class InFlight:
    """Rank 0's handle on a batch it pushed into the ring: each (tensor, work) pair keeps the
    tensor alive until its send or receive completes."""

    sends: list[tuple[torch.Tensor, object]]
    receives: list[tuple[torch.Tensor, object]]


def lm_head_layers(cfg: ModelConfig) -> float:
    """The LM head's weights in decoder layers' worth: work stage 0 does besides its layers for
    every row that samples (in decode, every row)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = cfg.hidden_size * (2 * q + 2 * kv + 3 * cfg.intermediate_size)
    return cfg.vocab_size * cfg.hidden_size / layer


def stage_layers(cfg: ModelConfig, rank: int, world: int) -> range:
    """The decoder layers of stage `rank` of `world`. With batches in flight the busiest stage
    sets the pace, so stage 0 takes the LM head's worth of layers fewer than an equal share
    (at least one; for a large model's head a layer or so, for SmolLM2's 49k-row head eight:
    11 of 30 layers at 2 stages); the later stages split the rest, lower ones taking the
    remainder."""
    if cfg.architecture not in ("llama", "gemma3"):
        raise ValueError(f"pipeline parallelism supports Llama and Gemma 3 models; {cfg.name} "
                         f"is {cfg.architecture}")
    if world > cfg.num_layers:
        raise ValueError(f"--pipeline-parallel-size {world} exceeds {cfg.name}'s "
                         f"{cfg.num_layers} layers (each stage needs at least one)")
    if world == 1:
        return range(cfg.num_layers)
    head = lm_head_layers(cfg)
    first = min(max(1, round((cfg.num_layers + head) / world - head)),
                cfg.num_layers - (world - 1))
    if rank == 0:
        return range(first)
    rest = split(cfg.num_layers - first, world - 1, rank - 1)
    return range(first + rest.start, first + rest.stop)


def keep_stage(model: nn.Module, layers: range, first: bool) -> None:
    """Cut `model` (already quantized and packed: GGUF weights are found by layer number) to
    `layers`; a later stage also drops the embedding and the LM head, which only rank 0 uses."""
    model.layers = nn.ModuleList(model.layers[i] for i in layers)
    if not first:
        model.embed_tokens = None
        model.lm_head = None


class PipelineStages:
    """One rank's side of the ring. Ranks are stage-major (rank = stage * tp + tp_rank); each
    tensor-parallel rank passes its (replicated) hidden states to the same tp_rank of the next
    stage, and the last stage back to stage 0, whose ranks all get the final hidden states
    (under tensor parallelism the LM head is a collective of stage 0's ranks)."""

    def __init__(self, group: TPGroup, tp: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT):
        self.group, self.hidden_size, self.dtype, self.timeout = group, hidden_size, dtype, timeout
        self.device = device
        self.tp = tp
        self.stage, self.tp_rank = divmod(group.rank, tp)
        self.num_stages = group.world // tp
        # Batches in flight: one per stage keeps all busy. Under tensor parallelism stage 0's
        # other ranks run each batch to its end (their LM head is a collective with rank 0), so
        # one batch at a time, cut into a micro-batch per stage instead.
        self.depth = self.num_stages if tp == 1 else 1
        self.parts = 1 if self.depth > 1 else self.num_stages  # micro-batches per batch
        self._batches = 0  # batches this rank has run: the same count on every rank

    @property
    def first(self) -> bool:
        return self.stage == 0

    def run(self, model: nn.Module, prepared: list[Prepared], kv_stores: list[KVStore]
            ) -> torch.Tensor | None:
        if self.first:
            return self.finish(model, self.start(model, prepared, kv_stores))
        self._later(model, prepared, kv_stores)
        return None

    def start(self, model: nn.Module, prepared: list[Prepared], kv_stores: list[KVStore]
              ) -> InFlight:
        """Stage 0: post the receives of the batch's output, run the stage, send it on."""
        tags = self._tags(len(prepared))
        last = (self.num_stages - 1) * self.tp + self.tp_rank
        receives = []
        for tag, (ids, _, _) in zip(tags, prepared, strict=True):
            x = torch.empty(len(ids), self.hidden_size, dtype=self.dtype, device=self.device)
            receives.append((x, self.group.group.recv([x], last, tag)))
        sends = []
        for tag, (ids, positions, meta) in zip(tags, prepared, strict=True):
            x = model.run_layers(model.embed(ids), positions, kv_stores, meta).contiguous()
            sends.append((x, self.group.group.send([x], self.group.rank + self.tp, tag)))
        return InFlight(sends, receives)

    def finish(self, model: nn.Module, flight: InFlight) -> torch.Tensor:
        """Stage 0: the batch's final hidden states, once the last stage has sent them back."""
        last = (self.num_stages - 1) * self.tp + self.tp_rank
        for _, work in flight.receives:
            self._wait(work, f"hidden states from rank {last}")
        self._finish(flight.sends)
        return model.final_norm(torch.cat([x for x, _ in flight.receives]))

    def _later(self, model: nn.Module, prepared: list[Prepared], kv_stores: list[KVStore]
               ) -> None:
        rank = self.group.rank
        after = rank + self.tp if self.stage < self.num_stages - 1 else self.tp_rank
        pending = []
        for tag, (ids, positions, meta) in zip(self._tags(len(prepared)), prepared, strict=True):
            x = self._receive(len(ids), rank - self.tp, tag)
            y = model.run_layers(x, positions, kv_stores, meta).contiguous()
            pending.append((y, self.group.group.send([y], after, tag)))
        self._finish(pending)

    def _tags(self, parts: int) -> range:
        first = (self._batches % TAG_CYCLE) * self.num_stages
        self._batches += 1
        return range(first, first + parts)

    def _receive(self, rows: int, src: int, tag: int) -> torch.Tensor:
        x = torch.empty(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        self._wait(self.group.group.recv([x], src, tag), f"hidden states from rank {src}")
        return x

    def _finish(self, pending: list) -> None:
        for _, work in pending:
            self._wait(work, "a send to the next stage")

    def _wait(self, work: object, what: str) -> None:
        try:
            work.wait(self.timeout)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise RuntimeError(f"pipeline stage {self.group.rank}: {what} failed "
                               f"(a rank died or hung): {exc}") from exc
