"""Pipeline parallelism: the decoder layers cut into contiguous stages, one process each, the
hidden states passed around a ring.

Rank 0 (the engine's process) holds the embedding, the first stage, the final norm and the LM
head; ranks 1..M-1 hold only their layers (and their layers' KV cache: the same block ids on
every stage, so the one scheduler's block tables serve them all). A step's batch is cut into
micro-batches (model_runner.micro_batches); rank 0 pushes each through its stage and sends it
on, so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1. The last stage
sends its output back to rank 0, which normalizes and samples. Sends are asynchronous; every
receive waits at most the group's timeout, and a peer that died fails the step with an error.

Each micro-batch holds whole requests, so a request's rows are computed exactly as in one
process (the batch-invariance the engine already keeps: tests compare token for token).
"""

from __future__ import annotations

import datetime

import torch
from torch import nn

from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention_metadata import AttentionMetadata
from pagoda.models.config import ModelConfig
from pagoda.parallel.comm import COLLECTIVE_TIMEOUT, TPGroup
from pagoda.parallel.partition import split

Prepared = tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]  # ids, positions, metas


def stage_layers(cfg: ModelConfig, rank: int, world: int) -> range:
    """The decoder layers of stage `rank` of `world`; lower stages take the remainder."""
    if cfg.architecture not in ("llama", "gemma3"):
        raise ValueError(f"pipeline parallelism supports Llama and Gemma 3 models; {cfg.name} "
                         f"is {cfg.architecture}")
    if world > cfg.num_layers:
        raise ValueError(f"--pipeline-parallel-size {world} exceeds {cfg.name}'s "
                         f"{cfg.num_layers} layers (each stage needs at least one)")
    return split(cfg.num_layers, world, rank)


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
        self.parts = self.num_stages  # micro-batches per step: one per stage keeps all busy

    @property
    def first(self) -> bool:
        return self.stage == 0

    def run(self, model: nn.Module, prepared: list[Prepared], kv_stores: list[KVStore]
            ) -> torch.Tensor | None:
        if self.first:
            return self._first(model, prepared, kv_stores)
        self._later(model, prepared, kv_stores)
        return None

    def _first(self, model: nn.Module, prepared: list[Prepared], kv_stores: list[KVStore]
               ) -> torch.Tensor:
        pending = []  # (tensor, work): a send's tensor must live until the send completes
        for tag, (ids, positions, meta) in enumerate(prepared):
            x = model.run_layers(model.embed(ids), positions, kv_stores, meta).contiguous()
            pending.append((x, self.group.group.send([x], self.group.rank + self.tp, tag)))
        last = (self.num_stages - 1) * self.tp + self.tp_rank
        outputs = [self._receive(len(ids), last, tag) for tag, (ids, _, _) in enumerate(prepared)]
        self._finish(pending)
        return model.final_norm(torch.cat(outputs))

    def _later(self, model: nn.Module, prepared: list[Prepared], kv_stores: list[KVStore]
               ) -> None:
        rank = self.group.rank
        after = rank + self.tp if self.stage < self.num_stages - 1 else self.tp_rank
        pending = []
        for tag, (ids, positions, meta) in enumerate(prepared):
            x = self._receive(len(ids), rank - self.tp, tag)
            y = model.run_layers(x, positions, kv_stores, meta).contiguous()
            pending.append((y, self.group.group.send([y], after, tag)))
        self._finish(pending)

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
