"""Contracts between the scheduler and the model runner: ids and counts, never tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.engine.outputs import TokenLogprobs
from pagoda.sampling.params import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    req_id: str
    token_ids: list[int]  # the tokens whose K/V this step computes
    num_computed_tokens: int  # position of token_ids[0]
    block_ids: list[list[int]]  # the request's whole block table in each KV group
    sample: bool  # the chunk reaches the last known token: sample the next one
    sampling_params: SamplingParams
    sample_index: int  # which of the parent's n samples (seeds differ per sample)
    prompt_token_ids: list[int]  # for penalties; read-only
    output_token_ids: list[int]  # for penalties and seeded sampling; read-only
    # Draft tokens the worker may propose and verify in this step after token_ids[-1] (their KV
    # slots are allocated); 0 unless speculative decoding is on and pays for this request.
    num_spec_tokens: int = 0

    @property
    def context_token_ids(self) -> list[int]:
        """Every known token of the request (prompt + output), the last one included."""
        return self.prompt_token_ids + self.output_token_ids


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class ModelRunnerOutput:
    # New tokens of each request that sampled: one, or with speculation the accepted drafts
    # followed by one token sampled from the target (a correction or the bonus).
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobs]]  # one per new token; only if asked for
    num_draft_tokens: dict[str, int] = field(default_factory=dict)  # drafts verified this step
    # requests asking for prompt log-probs, per prefill chunk: (index of the first prompt token
    # scored, one entry per prompt token scored from there)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # requests whose next position allows no token (why): they sample nothing and are failed
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    # with the request's first token, if asked for: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprobs | None] | None = None
