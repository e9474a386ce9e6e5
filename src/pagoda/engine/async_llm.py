"""Asynchronous front-end: callers await outputs while the engine loop runs elsewhere.

The HTTP side never blocks the engine and the engine never blocks the event loop: the loop
(`EngineCore`) runs either in a background thread of this process (`ThreadCoreClient`) or in a
separate engine process (`ProcessCoreClient`, `engine_process=True`), and this class only keeps
one asyncio queue per request. Commands (add, abort) go through the core client; outputs come back
on the event loop thread. A request whose consumer goes away (client disconnect, cancel, timeout)
is aborted, and its KV blocks are freed at the engine's next iteration. If the engine dies, every
waiting request ends with `error` set and new ones raise `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from pagoda.engine.config import EngineConfig
from pagoda.engine.core_client import EngineCoreClient, ThreadCoreClient
from pagoda.engine.engine_core import AbortRequest, AddRequest, EngineCoreOutputs, EngineInfo
from pagoda.engine.llm_engine import EngineStats
from pagoda.engine.outputs import RequestOutput
from pagoda.loader.tokenizer import Tokenizer
from pagoda.models.config import ModelConfig
from pagoda.sampling.params import SamplingParams

log = logging.getLogger(__name__)

TIMEOUT_ERROR = "request timed out"


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, core: EngineCoreClient):
        self.core = core
        self.info: EngineInfo = core.info
        self.tokenizer: Tokenizer = core.info.tokenizer
        self.model_config: ModelConfig = core.info.model_config
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stats = core.initial_stats
        self._error: str | None = None
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, engine_process: bool = False) -> AsyncLLM:
        """Load the model (blocking; call it off the event loop), in this process or in a
        spawned engine process."""
        if engine_process:
            from pagoda.engine.engine_process import ProcessCoreClient

            return cls(ProcessCoreClient.launch(config))
        from pagoda.engine.engine_factory import build_engine

        return cls(ThreadCoreClient(build_engine(config)))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.core.start(loop or asyncio.get_running_loop(), self._on_outputs, self._on_dead)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.core.shutdown(timeout)

    @property
    def error(self) -> str | None:
        """Why the engine is gone (thread died, process exited), or None while it runs."""
        return self._error or self.core.error

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The engine's counters as of its last iteration that changed them."""
        return self._stats

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams
                ) -> tuple[str | None, list[int]]:
        """Tokenize and validate; raises RequestError before anything is queued."""
        text, ids = self.info.validator.encode_prompt(self.tokenizer, prompt)
        self.info.validator.validate(ids, params)
        return text, ids

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       req_id: str | None = None, timeout: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs of one request until one has `finished` set.

        `timeout` (seconds) ends the request with finish_reason "abort" and `error` set. An engine
        failure ends it with an output whose `error` is set and which has no samples.
        """
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        text, ids = self.prepare(prompt, params)
        async for out in self._run(text, ids, params, req_id, timeout):
            yield out

    async def embed(self, token_ids: list[int], req_id: str | None = None,
                    timeout: float | None = None) -> RequestOutput:
        """The final output of one embedding request (`embedding` set unless `error` is); the
        engine must be an embedding engine (`info.task == "embed"`) and checks the input."""
        final = None
        async for out in self._run(None, token_ids, None, req_id, timeout):
            final = out
        assert final is not None
        return final

    async def _run(self, text: str | None, ids: list[int], params: SamplingParams | None,
                   req_id: str | None, timeout: float | None) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        req_id = req_id or f"req-{next(self._ids)}"
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[req_id] = stream
        self.core.send(AddRequest(req_id, text, ids, params, time.monotonic()))
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        prompt_logprobs = None
        try:
            while not finished:
                try:
                    # no wait_for without a deadline: it costs a task per token
                    out = await (stream.get() if deadline is None else
                                 asyncio.wait_for(stream.get(), deadline - time.monotonic()))
                except (asyncio.TimeoutError, TimeoutError):
                    self.core.send(AbortRequest(req_id, "abort", TIMEOUT_ERROR))
                    deadline = None  # the engine answers with the final (aborted) output
                    continue
                finished = out.finished
                # an engine process sends outputs without the prompt, and its log-probs once
                if not out.prompt_token_ids:
                    out.prompt, out.prompt_token_ids = text, ids
                if out.prompt_logprobs is not None:
                    prompt_logprobs = out.prompt_logprobs
                elif prompt_logprobs is not None:
                    out.prompt_logprobs = prompt_logprobs
                yield out
        finally:
            self._streams.pop(req_id, None)
            if not finished and self._error is None:
                self.core.send(AbortRequest(req_id))

    def abort(self, req_id: str) -> None:
        self.core.send(AbortRequest(req_id))

    # -- callbacks from the core client, on the event loop thread ----------------------------
    def _on_outputs(self, batch: EngineCoreOutputs) -> None:
        self._stats = batch.stats
        for out in batch.outputs:
            stream = self._streams.get(out.req_id)
            if stream is not None:
                stream.put_nowait(out)

    def _on_dead(self, reason: str) -> None:
        if self._error is not None:
            return
        self._error = reason
        log.error("engine failed: %s; failing %d waiting requests", reason, len(self._streams))
        for req_id, stream in self._streams.items():
            stream.put_nowait(RequestOutput(req_id, None, [], [], True, None,
                                            f"engine failed: {reason}"))
