"""What the engine hands back to its callers: per-sample and per-request outputs.

Streaming callers receive `RequestOutput`s whose samples carry the *delta* since the previous one
(`text`, `token_ids`, `logprobs`); the final output of `LLM.generate` carries whole texts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# One generated position: {token_id: logprob} holding the top-N alternatives and the sampled token.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprobs] | None = None
    num_generated_tokens: int = 0  # cumulative, also in delta outputs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_delta(samples: dict[int, CompletionOutput], delta: CompletionOutput) -> None:
    """Fold a streamed delta into the accumulated sample of the same index (created on first)."""
    have = samples.get(delta.index)
    if have is None:
        samples[delta.index] = dataclasses.replace(
            delta, token_ids=list(delta.token_ids),
            logprobs=None if delta.logprobs is None else list(delta.logprobs))
        return
    have.text += delta.text
    have.token_ids += delta.token_ids
    if have.logprobs is not None and delta.logprobs:
        have.logprobs += delta.logprobs
    have.finish_reason, have.stop_reason = delta.finish_reason, delta.stop_reason
    have.num_generated_tokens = delta.num_generated_tokens


# A RequestOutput.error starting with this is the request's own fault (a constraint the engine
# found it cannot satisfy), not the engine's: the server answers it as a 400.
REQUEST_ERROR = "invalid request: "


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None
    # if asked for: one entry per prompt token ({token_id: logprob}, the actual token included;
    # None for the first), carried by every output once the prompt has been scored
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # embedding models: the pooled vector (float32 values), on the request's only output
    embedding: list[float] | None = None
