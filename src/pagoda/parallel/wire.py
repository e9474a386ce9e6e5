"""What rank 0 tells its workers: first their orders (who they are, where the group meets),
then every step what a worker needs of a scheduled request to run its forward: the tokens,
positions and block table, and the prompt for prompt log-probs (their LM-head calls are
collectives too, so every rank must make them). Sampling happens on rank 0 alone, so sampling
parameters, grammars and output tokens stay there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.output import ScheduledRequest

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig


@dataclass(frozen=True)
class Orders:
    config: EngineConfig  # rank 0's: every rank prepares the model the same way
    model_path: str  # the same files at the same path on every node
    rank: int
    world: int
    host: str  # the group's rendezvous (rank 0's TCPStore)
    port: int
    threads: int
    shared_memory: bool  # every rank on one machine: collectives through /dev/shm


@dataclass(frozen=True)
class StepRow:
    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[list[int]]
    sample: bool
    prompt_logprobs: int | None
    prompt_token_ids: list[int]  # empty unless prompt_logprobs is set


def to_wire(r: ScheduledRequest) -> StepRow:
    top = r.sampling_params.prompt_logprobs
    return StepRow(r.req_id, r.token_ids, r.num_computed_tokens, r.block_ids, r.sample, top,
                   r.prompt_token_ids if top is not None else [])


def from_wire(row: StepRow) -> ScheduledRequest:
    return ScheduledRequest(
        req_id=row.req_id, token_ids=row.token_ids, num_computed_tokens=row.num_computed_tokens,
        block_ids=row.block_ids, sample=row.sample,
        sampling_params=SamplingParams(prompt_logprobs=row.prompt_logprobs), sample_index=0,
        prompt_token_ids=row.prompt_token_ids, output_token_ids=[])
