"""Asynchronous front-end: the engine steps in one background thread; callers await outputs.

The HTTP side never blocks the engine and the engine never blocks the event loop: commands (add,
abort) cross into the engine thread through a queue, outputs come back with
`call_soon_threadsafe`. A request whose consumer goes away (client disconnect, cancel, timeout) is
aborted, and its KV blocks are freed at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Add:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    req_id: str
    reason: str = "abort"
    error: str | None = None


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self._commands: queue.Queue[Any] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls(LLMEngine(config))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (read without locking the engine)."""
        return self._stats

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams
                ) -> tuple[str | None, list[int]]:
        """Tokenize and validate; raises RequestError before anything is queued."""
        text, ids = self.engine.encode_prompt(prompt)
        self.engine.validate(ids, params)
        return text, ids

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       req_id: str | None = None, timeout: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs of one request until it finishes.

        `timeout` (seconds) ends the request with finish_reason "abort" and `error` set.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine failed: {self._error}")
        text, ids = self.prepare(prompt, params)
        req_id = req_id or self.engine.new_request_id()
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[req_id] = stream
        self._commands.put(_Add(req_id, text, ids, params, time.monotonic()))
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            while not finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    out = await asyncio.wait_for(stream.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    self._commands.put(_Abort(req_id, "abort", "request timed out"))
                    deadline = None  # the engine answers with the final (aborted) output
                    continue
                finished = out.finished
                if out.error and not finished:
                    raise EngineDeadError(out.error)
                yield out
        finally:
            self._streams.pop(req_id, None)
            if not finished:
                self._commands.put(_Abort(req_id))

    def abort(self, req_id: str) -> None:
        self._commands.put(_Abort(req_id))

    # -- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished_requests()
                outputs = self._apply_commands(block)
                if self.engine.has_unfinished_requests():
                    outputs += self.engine.step()
                    self.num_steps += 1
                self._stats = self.engine.stats()
                if outputs:
                    self._deliver_threadsafe(outputs)
        except BaseException as exc:  # the engine is broken: fail every waiting caller
            log.exception("engine loop failed")
            self._error = exc
            self._deliver_threadsafe([RequestOutput(rid, None, [], [], False, None, str(exc))
                                      for rid in list(self._streams)])

    def _apply_commands(self, block: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return outputs
        while cmd is not None or not self._commands.empty():
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_tokenized_request(cmd.req_id, cmd.prompt, cmd.prompt_token_ids,
                                                      cmd.params, cmd.arrival_time)
                except ValueError as exc:
                    outputs.append(RequestOutput(cmd.req_id, cmd.prompt, cmd.prompt_token_ids,
                                                 [], False, None, str(exc)))
            elif isinstance(cmd, _Abort):
                out = self.engine.abort_request(cmd.req_id, cmd.reason, cmd.error)
                if out is not None:
                    outputs.append(out)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        return outputs

    def _deliver_threadsafe(self, outputs: list[RequestOutput]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.req_id)
            if stream is not None:
                stream.put_nowait(out)
