"""Scheduling for embedding models: prefill-only requests packed under the token budget.

Invariant: a step takes waiting requests in arrival order while their tokens fit
`max_num_batched_tokens` and their count fits `max_num_seqs` (the first request always fits:
requests are at most `max_model_len` long, which the engine caps at the budget), computes
every one of them whole, and finishes them in that step. Nothing outlives a step — no KV
blocks, no partial state — so an abort only has to drop a waiting request, and a request's
vector never depends on its neighbours (attention is per sequence).

Why not chunked prefill: an encoder's attention is bidirectional, so a sequence cannot be split
across steps; a decoder embedding is pooled over every position, so splitting would need the
KV cache that embedding requests otherwise never hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class PoolingRequest:
    req_id: str
    prompt: str | None
    token_ids: list[int]
    arrival_time: float
    first_scheduled_time: float | None = None


class PoolingScheduler:
    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int):
        assert max_num_batched_tokens > 0 and max_num_seqs > 0
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[PoolingRequest] = deque()

    def add(self, request: PoolingRequest) -> None:
        self.waiting.append(request)

    def abort(self, req_id: str) -> bool:
        """Drop a waiting request; False if it is not waiting (finished or never added)."""
        for request in self.waiting:
            if request.req_id == req_id:
                self.waiting.remove(request)
                return True
        return False

    def schedule(self) -> list[PoolingRequest]:
        batch: list[PoolingRequest] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(batch) < self.max_num_seqs:
            n = len(self.waiting[0].token_ids)
            if batch and n > budget:
                break
            batch.append(self.waiting.popleft())
            budget -= n
        return batch

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
