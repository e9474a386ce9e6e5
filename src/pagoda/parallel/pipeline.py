"""Pipeline parallelism: the decoder layers cut into contiguous stages, one process each, the
hidden states passed around a ring.

Rank 0 (the engine's process) holds the embedding, the first stage, the final norm and the LM
head; ranks 1..M-1 hold only their layers (and their layers' KV cache: the same block ids on
every stage, so the one scheduler's block tables serve them all). The engine keeps `depth` (=
stages) scheduler batches of different requests in flight: rank 0 `start`s batch k + 1 through
its stage while the later stages still run batch k, and `finish`es batch k (receives it back
from the last stage; the runner then normalizes and samples) afterwards, so no stage waits for
a step to end. Every stage runs the batches in the order rank 0 started them, which makes this
the same computation as one batch after another: a request's rows are computed exactly as in
one process (the batch-invariance the engine keeps; tests compare token for token).

Each batch has its own message tag (a counter every rank advances per batch), and rank 0 posts
the receive of a batch's output when it starts it, so the last stage's send never waits for
rank 0's next step. Sends are asynchronous; every wait is bounded by the group's timeout, and a
peer that died fails the step with an error.
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
    """Rank 0's handle on a batch it pushed into the ring; it keeps the sent and the receiving
    tensors alive until their transfers complete."""

    sent: torch.Tensor
    send: object  # the send's work
    output: torch.Tensor  # where the last stage's hidden states land
    receive: object


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
        self.depth = self.num_stages  # batches in flight: one per stage keeps all busy
        self._batches = 0  # batches this rank has run: the same count on every rank

    @property
    def first(self) -> bool:
        return self.stage == 0

    def run(self, model: nn.Module, prepared: Prepared, kv_stores: list[KVStore]
            ) -> torch.Tensor | None:
        if self.first:
            return self.finish(model, self.start(model, prepared, kv_stores))
        self._later(model, prepared, kv_stores)
        return None

    def start(self, model: nn.Module, prepared: Prepared, kv_stores: list[KVStore]
              ) -> InFlight:
        """Stage 0: post the receive of the batch's output, run the stage, send it on."""
        ids, positions, meta = prepared
        tag = self._tag()
        last = (self.num_stages - 1) * self.tp + self.tp_rank
        out = torch.empty(len(ids), self.hidden_size, dtype=self.dtype, device=self.device)
        receive = self.group.group.recv([out], last, tag)
        x = model.run_layers(model.embed(ids), positions, kv_stores, meta).contiguous()
        return InFlight(x, self.group.group.send([x], self.group.rank + self.tp, tag), out,
                        receive)

    def finish(self, model: nn.Module, flight: InFlight) -> torch.Tensor:
        """Stage 0: the batch's final hidden states, once the last stage has sent them back."""
        last = (self.num_stages - 1) * self.tp + self.tp_rank
        self._wait(flight.receive, f"hidden states from rank {last}")
        self._wait(flight.send, "a send to the next stage")
        return model.final_norm(flight.output)

    def _later(self, model: nn.Module, prepared: Prepared, kv_stores: list[KVStore]) -> None:
        ids, positions, meta = prepared
        rank, tag = self.group.rank, self._tag()
        after = rank + self.tp if self.stage < self.num_stages - 1 else self.tp_rank
        x = self._receive(len(ids), rank - self.tp, tag)
        y = model.run_layers(x, positions, kv_stores, meta).contiguous()
        self._wait(self.group.group.send([y], after, tag), "a send to the next stage")

    def _tag(self) -> int:
        tag = self._batches % TAG_CYCLE
        self._batches += 1
        return tag

    def _receive(self, rows: int, src: int, tag: int) -> torch.Tensor:
        x = torch.empty(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        self._wait(self.group.group.recv([x], src, tag), f"hidden states from rank {src}")
        return x

    def _wait(self, work: object, what: str) -> None:
        try:
            work.wait(self.timeout)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise RuntimeError(f"pipeline stage {self.group.rank}: {what} failed "
                               f"(a rank died or hung): {exc}") from exc
