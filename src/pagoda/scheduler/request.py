"""The long-lived engine request, owned by the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pagoda.engine.outputs import TokenLogprobs
from pagoda.sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 0  # prompt + generated may not exceed this (context length)
    sample_index: int = 0  # which of the parent's n samples this is (seeds differ per sample)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    first_scheduled_time: float | None = None
    # log-probs of prompt tokens 1..P-1 so far (if asked for), in order; sent with the first token
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int:
        limit = self.max_total_tokens - self.num_prompt_tokens
        mt = self.sampling_params.max_tokens
        return limit if mt is None else min(mt, limit)

    def check_stop(self, token_id: int) -> None:
        """Token-level stop conditions after `token_id` was appended; sets finish_reason."""
        params = self.sampling_params
        n = len(self.output_token_ids)
        if n >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return
            if token_id in params.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
                return
        if n >= self.max_tokens:
            self.finish_reason = "length"
