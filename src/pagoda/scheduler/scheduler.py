"""Continuous-batching scheduler.

One invariant drives it: each request's `num_computed_tokens` catches up with its `num_tokens`
(prompt + generated) under a per-step token budget. Prefill, chunked prefill, resumption after
preemption and decode are all this one rule; a step samples for a request when its chunk reaches
the last known token.

Speculative decoding is the same rule: a decoding request may be given `num_spec_tokens` draft
tokens beyond its last known token (budget and KV slots included); the worker proposes and
verifies them, and `num_computed_tokens` then advances only over the accepted ones. The KV of
rejected drafts sits in slots past `num_computed_tokens`: it is overwritten later, blocks that
hold nothing computed are freed at once, and no prefix-cache hash covers them.

Order: running requests first (FCFS), then waiting ones. When KV blocks run out, the newest running
request is preempted by recompute: its blocks are freed (cached blocks stay findable) and it goes
back to the front of the waiting queue.

A pipeline keeps several batches in flight (engine/llm_engine.py): `schedule(busy, max_requests)`
leaves out the `busy` requests, whose tokens the pipeline has not returned yet (they are neither
scheduled nor preempted), and takes at most `max_requests`, so the running requests split into
one batch per stage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from pagoda.kv_cache.kv_cache_manager import KVCacheManager
from pagoda.scheduler.output import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from pagoda.scheduler.request import Request, RequestStatus
from pagoda.scheduler.spec_policy import SpecDecodeConfig, SpecPolicy


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    batching: str = "continuous"  # or "static": a fixed batch runs until its longest member ends

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.batching not in ("continuous", "static"):
            raise ValueError("batching must be 'continuous' or 'static'")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 spec: SpecPolicy | None = None):
        self.config = config
        self.kv = kv
        self.spec = spec or SpecPolicy(SpecDecodeConfig())
        self._finished: list[str] = []  # ended since the last take_finished()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- request lifecycle -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def finish_request(self, req_id: str, reason: str, stop_reason: str | int | None = None
                       ) -> None:
        """End a request now (abort, stop string): its blocks are freed at once."""
        request = self.requests.pop(req_id, None)
        if request is None:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = request.finish_reason or reason
        request.stop_reason = stop_reason if stop_reason is not None else request.stop_reason
        self.kv.forget(req_id)
        self.spec.forget(req_id)
        self._finished.append(req_id)

    def take_finished(self) -> list[str]:
        """Requests that ended since the last call (their workers' state can go)."""
        finished, self._finished = self._finished, []
        return finished

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self, busy: Collection[str] = (), max_requests: int | None = None
                 ) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        room = self.config.max_num_seqs if max_requests is None else max_requests
        chunks: dict[str, int] = {}
        spec: dict[str, int] = {}
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0 and len(chunks) < room:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0 or request.req_id in busy:
                i += 1
                continue
            if num_new == 1 and request.num_tokens > request.num_prompt_tokens:
                # the batch's size decides (a pipeline's batches share the running requests)
                k = self.spec.num_spec_tokens(request, min(len(self.running), room), budget - 1)
                # Drafts only get blocks that are free now: they never preempt anyone.
                if k and self.kv.allocate(request.req_id, request.num_computed_tokens + 1 + k):
                    spec[request.req_id] = k
                    budget -= k
            while not self.kv.allocate(request.req_id, request.num_computed_tokens + num_new):
                # the newest not yet scheduled and not in flight: `request` at the latest
                victim = next(r for r in reversed(self.running[i:]) if r.req_id not in busy)
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is request:
                    break
            else:
                chunks[request.req_id] = num_new
                budget -= num_new
                i += 1

        if not preempted and self._may_admit():
            budget = self._admit_waiting(budget, chunks, room)

        scheduled = [self._scheduled(self.requests[rid], n, spec.get(rid, 0))
                     for rid, n in chunks.items()]
        return SchedulerOutput(scheduled, sum(chunks.values()) + sum(spec.values()), preempted)

    def _may_admit(self) -> bool:
        return self.config.batching == "continuous" or not self.running

    def _admit_waiting(self, budget: int, chunks: dict[str, int], room: int) -> int:
        now = time.monotonic()
        deferred: list[Request] = []
        while (self.waiting and budget > 0 and len(chunks) < room
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting.popleft()
            cached = [] if request.sampling_params.prompt_logprobs is not None else \
                self.kv.find_cached_prefix(request.req_id, request.all_token_ids)
            num_cached = len(cached) * self.kv.block_size
            num_new = request.num_tokens - num_cached
            # Prompt blocks that an admitted request computes in this step are cache hits in the
            # next one: wait a step rather than compute them twice, when they are at least half
            # of this request's work (requests sharing a system prompt, n > 1 samples).
            if 2 * self.kv.num_in_flight_tokens(request.req_id, len(cached)) >= num_new:
                deferred.append(request)
                continue
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    self.waiting.appendleft(request)
                    break
                num_new = budget
            if not self.kv.allocate(request.req_id, num_cached + num_new, cached):
                self.waiting.appendleft(request)
                break
            self.kv.record_query(request.num_tokens, num_cached)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_prompt_tokens = num_cached
            self.running.append(request)
            chunks[request.req_id] = num_new
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the front
        return budget

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.req_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _scheduled(self, request: Request, num_new: int, num_spec: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        tokens = request.all_token_ids[start:start + num_new]
        return ScheduledRequest(
            req_id=request.req_id,
            token_ids=tokens,
            num_computed_tokens=start,
            block_ids=self.kv.block_ids(request.req_id),
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            sample_index=request.sample_index,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            num_spec_tokens=num_spec,
        )

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput
                           ) -> list[EngineCoreOutput]:
        outputs = []
        for item in sched.scheduled:
            request = self.requests.get(item.req_id)
            if request is None:  # finished (aborted) while the step ran
                continue
            if item.req_id in result.prompt_logprobs:
                first, entries = result.prompt_logprobs[item.req_id]
                have = len(request.prompt_logprobs) + 1  # index of the next prompt token
                # a recomputed chunk (after preemption) scores tokens already kept
                request.prompt_logprobs += entries[max(0, have - first):]
            new_token_ids = result.sampled_token_ids.get(item.req_id, [])
            # The step computed K/V for item.token_ids and the drafts after them; only accepted
            # drafts (all new tokens but the last) count as computed.
            num_accepted = max(0, len(new_token_ids) - 1)
            num_drafted = result.num_draft_tokens.get(item.req_id, 0)
            self.spec.record(item.req_id, num_drafted, num_accepted)
            request.num_computed_tokens += len(item.token_ids) + num_accepted
            emitted = []
            for token_id in new_token_ids:
                request.output_token_ids.append(token_id)
                emitted.append(token_id)
                request.check_stop(token_id)
                if request.finish_reason is not None:
                    break
            self.kv.commit_computed(request.req_id, request.all_token_ids,
                                    request.num_computed_tokens)
            if item.num_spec_tokens:
                self.kv.trim(request.req_id, request.num_computed_tokens)
            if not emitted:
                continue
            logprobs = result.logprobs.get(item.req_id)
            prompt_logprobs = None
            if (request.sampling_params.prompt_logprobs is not None
                    and len(request.output_token_ids) == len(emitted)):  # the first token
                prompt_logprobs = [None, *request.prompt_logprobs]
            outputs.append(EngineCoreOutput(request.req_id, emitted,
                                            None if logprobs is None else logprobs[:len(emitted)],
                                            request.finish_reason, request.stop_reason,
                                            request.first_scheduled_time,
                                            request.num_cached_prompt_tokens, prompt_logprobs))
            if request.finish_reason is not None:
                self.finish_request(request.req_id, request.finish_reason)
        return outputs

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        assert set(self.kv.block_tables) <= {r.req_id for r in self.running}
        for request in self.running:
            have = len(self.kv.block_tables.get(request.req_id, []))
            assert have >= self.kv.blocks_needed(request.num_computed_tokens)
