"""How `AsyncLLM` reaches its `EngineCore`: the contract, and the in-process (thread) client.

A core client carries commands to the loop and hands every `EngineCoreOutputs` back on the event
loop thread (`on_outputs`). If the loop dies it calls `on_dead(reason)` once, on the event loop
thread, and from then on `error` is set. After `shutdown()` neither callback fires again.

The engine process variant is in `engine_process.py`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from pagoda.engine.engine_core import EngineCommand, EngineCore, EngineCoreOutputs, EngineInfo
from pagoda.engine.llm_engine import EngineStats, LLMEngine

log = logging.getLogger(__name__)

OutputsCallback = Callable[[EngineCoreOutputs], None]
DeadCallback = Callable[[str], None]


class EngineCoreClient(Protocol):
    info: EngineInfo
    initial_stats: EngineStats

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputsCallback,
              on_dead: DeadCallback) -> None: ...

    def send(self, command: EngineCommand) -> None: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...

    @property
    def error(self) -> str | None:
        """Why the engine loop is gone, or None while it runs (or was never started)."""
        ...


class ThreadCoreClient:
    """The engine loop in a background thread of this process.

    The engine is built by the caller's thread and stepped by this one: on a loaded 2-core box,
    stepping from the building thread was 3-25x slower (docs/server.md).
    """

    def __init__(self, engine: LLMEngine):
        self.info = EngineInfo.of(engine)
        self.initial_stats = engine.stats()
        self._commands: queue.Queue[EngineCommand] = queue.Queue()
        self._core = EngineCore(engine, self._commands, self._emit)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_outputs: OutputsCallback | None = None
        self._error: str | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputsCallback,
              on_dead: DeadCallback) -> None:
        self._loop, self._on_outputs = loop, on_outputs
        self._thread = threading.Thread(target=self._run, args=(on_dead,),
                                        name="pagoda-engine", daemon=True)
        self._thread.start()

    def send(self, command: EngineCommand) -> None:
        self._commands.put(command)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def error(self) -> str | None:
        if self._error is None and self._thread is not None and not self._thread.is_alive() \
                and not self._stop.is_set():
            return "the engine thread exited"
        return self._error

    def _run(self, on_dead: DeadCallback) -> None:
        try:
            self._core.run(self._stop)
        except BaseException as exc:
            log.exception("engine loop failed")
            self._error = f"{type(exc).__name__}: {exc}"
            self._call_soon(on_dead, self._error)

    def _emit(self, batch: EngineCoreOutputs) -> None:
        assert self._on_outputs is not None
        self._call_soon(self._on_outputs, batch)

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed between the check and the call
                pass
