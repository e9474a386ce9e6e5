"""The server's handle on the engine: loading, admission control, timeouts and metrics.

Every endpoint (HTTP and WebSocket) runs requests through `EngineClient.generate`, so these
rules hold for all of them:
  * at most `max_waiting` admitted requests are waiting for their first output; one more is
    refused with 503 + Retry-After (a `Ticket` is held from admission to the first output);
  * a request outliving `request_timeout` is aborted by the engine (blocks freed) and its final
    output carries `error`;
  * a consumer that stops iterating (client gone, cancel) aborts the request: AsyncLLM's
    generator sends the abort from its `finally`, and the engine frees the blocks next iteration;
  * an engine that died (thread or process) fails its waiting requests and turns /health and new
    requests into 503 (status "failed").
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from pagoda.engine.async_llm import TIMEOUT_ERROR, AsyncLLM
from pagoda.engine.outputs import REQUEST_ERROR, CompletionOutput, RequestOutput, merge_delta
from pagoda.loader.model_loader import DEFAULT_MODEL, resolve_model_path
from pagoda.sampling.params import SamplingParams
from pagoda.server.config import ServerConfig
from pagoda.server.errors import APIError, overloaded
from pagoda.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from pagoda.engine.config import EngineConfig

T = TypeVar("T")
log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 16_384  # longer prompts are tokenized off the event loop


async def off_loop_if_long(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) for a request's text of `size` characters: in a worker thread past
    INLINE_TOKENIZE_CHARS (tokenizing or rendering megabytes takes seconds, which on the event
    loop would stall every client), inline below it (cheaper than a thread hop)."""
    if size > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


class Ticket:
    """One admitted request's place among the waiting; released once (first output or end)."""

    def __init__(self, client: EngineClient):
        self._client: EngineClient | None = client

    def release(self) -> None:
        if self._client is not None:
            self._client.num_pending -= 1
            self._client = None


@dataclass
class Completed:
    """A finished request, its per-sample deltas merged (non-streaming responses)."""

    output: RequestOutput
    samples: list[CompletionOutput] = field(default_factory=list)

    @property
    def num_generated_tokens(self) -> int:
        return sum(s.num_generated_tokens for s in self.samples)


class EngineClient:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.llm: AsyncLLM | None = None
        # loading -> ok | failed; ok -> failed when the engine dies; -> draining on shutdown
        self.status = "loading"
        self.detail: str | None = None
        self.num_pending = 0
        self.created = int(time.time())
        engine = config.engine
        self.weights = _weights(engine)  # `quantization` with auto settled
        self.metrics = ServerMetrics(lambda: self.llm, lambda: self.model_name, {
            "tensor_parallel_size": str(engine.tensor_parallel_size),
            "pipeline_parallel_size": str(engine.pipeline_parallel_size),
            "num_threads": str(engine.num_threads or torch.get_num_threads()),
            "quantization": self.weights, "dtype": engine.dtype})
        self.tracer: Tracer | None = None  # set when traces are exported (telemetry.py)
        self._fingerprint = "fp_pagoda"

    # -- lifecycle ---------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the model off the event loop (here or in an engine process), then start the
        engine loop."""
        try:
            llm = await asyncio.to_thread(AsyncLLM.from_config, self.config.engine,
                                          self.config.engine_process)
            # the grammar engine's import (~0.9 s) happens here, before the server reports
            # ready, rather than on the event loop in the first constrained request
            await asyncio.to_thread(importlib.import_module, "xgrammar")
        except Exception as exc:
            # one line for the operator (the cause is usually a flag or a path); the stack for
            # --log-level debug
            log.error("model loading failed: %s", exc)
            log.debug("model loading failed", exc_info=True)
            self.status, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            raise
        llm.start(asyncio.get_running_loop())
        self.llm = llm
        cfg = self.config.engine
        key = f"{llm.info.model_path}|{cfg.dtype}|{self.weights}|{cfg.kv_cache_dtype}"
        self._fingerprint = "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]
        self.status = "ok"
        log.info("model %s ready (max_model_len %d, engine in a %s)", self.model_name,
                 self.max_model_len, "process" if self.config.engine_process else "thread")

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()

    # -- properties --------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The API's model id: --served-model-name, else the checkpoint's file or folder name
        (GGUF `general.name` values hold spaces and are poor ids)."""
        if self.config.served_model_name:
            return self.config.served_model_name
        model = self.config.engine.model
        if model is None:
            return DEFAULT_MODEL
        base = os.path.basename(os.path.normpath(model))
        return base[:-len(".gguf")] if base.endswith(".gguf") else base

    @property
    def max_model_len(self) -> int:
        return self.require_llm().info.max_model_len

    @property
    def system_fingerprint(self) -> str:
        return self._fingerprint

    def check_engine(self) -> str:
        """The current status, first turning "ok" into "failed" if the engine has died."""
        if self.status == "ok" and self.llm is not None and self.llm.error is not None:
            self.status, self.detail = "failed", f"the engine failed: {self.llm.error}"
        return self.status

    @property
    def failed(self) -> bool:
        """The model did not load, or the engine died at some point (the exit status is 1)."""
        return self.status == "failed" or (self.llm is not None and self.llm.error is not None)

    def require_llm(self) -> AsyncLLM:
        if self.check_engine() == "failed" and self.llm is not None:
            raise APIError(503, self.detail or "the engine failed", code="engine_dead",
                           headers={"Retry-After": str(self.config.retry_after)})
        if self.llm is None:
            message = "the model is still loading" if self.status == "loading" else \
                f"the model failed to load: {self.detail}"
            raise APIError(503, message, code="model_not_ready",
                           headers={"Retry-After": str(self.config.retry_after)})
        return self.llm

    def check_model(self, name: str | None) -> None:
        """Requests may omit `model`; a named model must be the one served (404 otherwise)."""
        if name and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")

    def require_generator(self) -> AsyncLLM:
        llm = self.require_llm()
        if llm.info.task != "generate":
            raise APIError(400, f"the model '{self.model_name}' is an embedding model: it "
                           "serves /v1/embeddings and does not generate text", "model")
        return llm

    # -- requests ----------------------------------------------------------------------------
    async def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and validate (RequestError -> 400 via the error handlers)."""
        llm = self.require_generator()
        size = len(prompt) if isinstance(prompt, str) else 0  # token ids need no tokenizer
        _, ids = await off_loop_if_long(size, llm.prepare, prompt, params)
        return ids

    def admit(self, over_limit: bool = False) -> Ticket:
        """A ticket for one request to wait in the queue, or a 503; `over_limit` takes one past
        --max-waiting (prompt_batch.admit_all: a batch larger than the limit)."""
        if self.status == "draining":
            raise overloaded(self.config.retry_after, "the server is shutting down")
        if not over_limit and self.num_pending >= self.config.max_waiting:
            raise overloaded(self.config.retry_after,
                             f"too many requests waiting ({self.num_pending}); retry later")
        self.num_pending += 1
        return Ticket(self)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, ticket: Ticket,
                       req_id: str) -> AsyncIterator[RequestOutput]:
        """Delta outputs of one request; closing the iterator early aborts it."""
        llm = self.require_generator()
        last = None
        finished = False
        generated: dict[int, int] = {}  # sample index -> tokens so far (for the trace)
        ended: list[str] = []  # every sample's finish reason (for the trace)
        try:
            async for out in llm.generate(prompt_ids, params, req_id,
                                          self.config.request_timeout):
                ticket.release()
                for o in out.outputs:
                    generated[o.index] = o.num_generated_tokens
                    ended += [o.finish_reason] if o.finish_reason else []
                now = time.monotonic()
                if last is None:
                    self.metrics.observe_first_output(out.metrics)
                else:
                    num_new = max((len(o.token_ids) for o in out.outputs), default=0)
                    self.metrics.observe_itl(now - last, num_new)
                last = now
                if out.finished:
                    finished = True
                    reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
                    self.metrics.observe_finished(out.metrics, reasons)
                    if self.tracer is not None:
                        self._trace(req_id, prompt_ids, params, out, sum(generated.values()),
                                    ended)
                yield out
        finally:
            ticket.release()
            if not finished:  # the consumer left: AsyncLLM aborts the request
                self.metrics.observe_finished(None, ["abort"])

    def _trace(self, req_id: str, prompt_ids: list[int], params: SamplingParams,
                out: RequestOutput, num_generated: int, reasons: list[str]) -> None:
        """The finished request as an `llm_request` span (vLLM's attribute names)."""
        from pagoda.telemetry import record_llm_request

        m = out.metrics
        if self.tracer is None or m is None or m.finished_time is None:
            return

        def between(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        record_llm_request(self.tracer, {
            "gen_ai.request.id": req_id, "gen_ai.response.model": self.model_name,
            "gen_ai.request.max_tokens": params.max_tokens, "gen_ai.request.n": params.n,
            "gen_ai.request.temperature": params.temperature, "gen_ai.request.top_p": params.top_p,
            "gen_ai.usage.prompt_tokens": len(prompt_ids),
            "gen_ai.usage.completion_tokens": num_generated,
            "gen_ai.response.finish_reasons": reasons,
            "gen_ai.latency.time_in_queue": between(m.arrival_time, m.first_scheduled_time),
            "gen_ai.latency.time_to_first_token": between(m.arrival_time, m.first_token_time),
            "gen_ai.latency.time_in_model_prefill": between(m.first_scheduled_time,
                                                            m.first_token_time),
            "gen_ai.latency.time_in_model_decode": between(m.first_token_time, m.finished_time),
            "gen_ai.latency.e2e": m.finished_time - m.arrival_time,
            "pagoda.num_preemptions": m.num_preemptions,
            "pagoda.num_cached_tokens": m.num_cached_tokens,
        }, m.arrival_time, m.finished_time)

    async def complete(self, outputs: AsyncIterator[RequestOutput]) -> Completed:
        """Drain a request; raises APIError (504 on timeout, 500 on engine errors)."""
        merged: dict[int, CompletionOutput] = {}
        final = None
        async for out in outputs:
            for delta in out.outputs:
                merge_delta(merged, delta)
            final = out
        if final is None:
            raise APIError(500, "the engine returned no output")
        if final.error:
            raise error_of(final.error)
        return Completed(final, [merged[i] for i in sorted(merged)])


def error_of(message: str) -> APIError:
    if message == TIMEOUT_ERROR:
        return APIError(504, "the request timed out", code="request_timeout")
    if message.startswith(REQUEST_ERROR):
        return APIError(400, message.removeprefix(REQUEST_ERROR))
    return APIError(500, f"the engine failed the request: {message}", code="engine_error")


def _weights(engine: EngineConfig) -> str:
    """The weight format the engine will load (`quantization` with auto settled), for the
    engine_config_info metric; a path that does not resolve is reported by the load itself."""
    try:
        return engine.quantization_for(resolve_model_path(engine.model))
    except (OSError, ValueError):
        return engine.quantization
