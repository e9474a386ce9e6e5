"""Turns per-step `EngineCoreOutput`s into caller-facing `RequestOutput`s.

Owns per-request front-end state: detokenizers, the n-sample fan-out (child `req_id#i` → parent),
and timing metrics. Stop strings are found here, so it reports which requests the scheduler must
end (`to_finish`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from pagoda.loader.tokenizer import Tokenizer
from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.output import EngineCoreOutput


@dataclass
class SampleState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class ParentState:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once the prompt is scored

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


def child_id(req_id: str, index: int, n: int) -> str:
    return req_id if n == 1 else f"{req_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.children: dict[str, tuple[str, int]] = {}  # child req_id -> (parent, index)

    def add(self, req_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, arrival_time: float) -> list[str]:
        samples = []
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, params)
            samples.append(SampleState(i, detok, logprobs=[] if params.logprobs is not None
                                       else None))
            self.children[child_id(req_id, i, params.n)] = (req_id, i)
        self.parents[req_id] = ParentState(req_id, prompt, prompt_token_ids, samples,
                                           RequestMetrics(arrival_time))
        return [child_id(req_id, i, params.n) for i in range(params.n)]

    def parent_of(self, child: str) -> str | None:
        entry = self.children.get(child)
        return None if entry is None else entry[0]

    def child_ids(self, req_id: str) -> list[str]:
        parent = self.parents.get(req_id)
        if parent is None:
            return []
        n = len(parent.samples)
        return [child_id(req_id, i, n) for i in range(n)]

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs for callers, child ids that a stop string finished)."""
        now = time.monotonic()
        deltas: dict[str, list[CompletionOutput]] = {}
        to_finish: list[str] = []
        for out in outputs:
            if out.req_id not in self.children:
                continue
            parent_id, index = self.children[out.req_id]
            parent = self.parents[parent_id]
            sample = parent.samples[index]
            m = parent.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.first_scheduled_time = out.first_scheduled_time
                m.num_cached_tokens = out.num_cached_tokens
            m.last_token_time = now
            if out.prompt_logprobs is not None and parent.prompt_logprobs is None:
                parent.prompt_logprobs = out.prompt_logprobs  # n samples: the same prompt
            seen = sample.detok.num_tokens
            stop = sample.detok.update(out.new_token_ids)
            if stop is not None:
                # A step may carry several tokens (accepted drafts): those after the token that
                # completed the stop string were never generated, as far as the caller knows.
                kept = sample.detok.num_tokens - seen
                out = dataclasses.replace(out, new_token_ids=out.new_token_ids[:kept],
                                          new_logprobs=out.new_logprobs and
                                          out.new_logprobs[:kept])
            sample.token_ids += out.new_token_ids
            if sample.logprobs is not None and out.new_logprobs:
                sample.logprobs += out.new_logprobs
            if stop is not None and out.finish_reason is None:
                sample.finish_reason, sample.stop_reason = "stop", stop
                to_finish.append(out.req_id)
            elif out.finish_reason is not None:
                sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            deltas.setdefault(parent_id, []).append(self._delta(sample, out))
        return [self._emit(pid, d) for pid, d in deltas.items()], to_finish

    def _delta(self, sample: SampleState, out: EngineCoreOutput) -> CompletionOutput:
        finished = sample.finish_reason is not None
        return CompletionOutput(
            index=sample.index,
            text=sample.detok.take_delta(finished),
            token_ids=list(out.new_token_ids),
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            logprobs=list(out.new_logprobs) if sample.logprobs is not None and out.new_logprobs
            else ([] if sample.logprobs is not None else None),
            num_generated_tokens=len(sample.token_ids),
        )

    def _emit(self, parent_id: str, deltas: list[CompletionOutput]) -> RequestOutput:
        parent = self.parents[parent_id]
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = time.monotonic()
            self._drop(parent_id)
        return RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids, deltas,
                             finished, parent.metrics,
                             prompt_logprobs=parent.prompt_logprobs)

    def abort(self, req_id: str, reason: str = "abort", error: str | None = None
              ) -> RequestOutput | None:
        """End every unfinished sample of a parent request; returns its final output."""
        parent = self.parents.get(req_id)
        if parent is None:
            return None
        deltas = []
        for sample in parent.samples:
            if sample.finish_reason is None:
                sample.finish_reason = reason
                deltas.append(CompletionOutput(sample.index, sample.detok.take_delta(True), [],
                                               reason, None, [] if sample.logprobs is not None
                                               else None, len(sample.token_ids)))
        out = self._emit(req_id, deltas)
        out.error = error
        return out

    def _drop(self, parent_id: str) -> None:
        parent = self.parents.pop(parent_id)
        n = len(parent.samples)
        for i in range(n):
            self.children.pop(child_id(parent_id, i, n), None)
