"""The contract between a draft proposer and the model runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pagoda.scheduler.output import ScheduledRequest


@dataclass(frozen=True)
class Draft:
    """Tokens proposed to follow a request's last known token, and the distribution each was
    drawn from: `probs` (num_tokens, V), normalized; None means point masses (prompt lookup, or
    a greedy draft), which the rejection rule treats as q(token) = 1."""

    token_ids: list[int]
    probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.probs is None or self.probs.shape[0] == len(self.token_ids)

    def head(self, num: int) -> Draft:
        return Draft(self.token_ids[:num], None if self.probs is None else self.probs[:num])


class Proposer(Protocol):
    def propose(self, requests: list[ScheduledRequest]) -> dict[str, Draft]:
        """Drafts for requests scheduled with `num_spec_tokens` > 0 (at most that many each;
        a request may get none)."""
        ...

    def release(self, req_ids: list[str]) -> None:
        """Drop per-request state of requests that finished or were preempted."""
        ...
