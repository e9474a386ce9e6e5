"""The engine loop in its own process (`pagoda serve --engine-process`), as vLLM v1 runs it.

The server process keeps the event loop and HTTP; a spawned child loads the model and runs
`EngineCore`. They talk over one duplex `multiprocessing` pipe (pickled dataclasses):

  front-end -> engine: `AddRequest`, `AbortRequest`, None (stop)
  engine -> front-end: `EngineReady` once (tokenizer, model config, validation limits, so the
                       front-end never loads the checkpoint), then `EngineCoreOutputs` per
                       iteration, or `EngineFailed` (load or loop error) before exiting.

Each side has exactly one reader and one writer thread on the pipe:
  * child: the main thread built the engine and reads commands into a queue; a second thread
    steps the engine and writes outputs (stepping from the building thread was 3-25x slower on
    this box, docs/server.md);
  * server: the event loop thread both writes (under a lock) and reads: the pipe is one of the
    loop's readers, so each step's outputs reach the streams without a thread hop. (A reader
    thread handing messages over with `call_soon_threadsafe` woke two threads per decoded token
    and passed the GIL between them, CPU taken from the engine on a 2-core machine:
    docs/benchmarks.md, "Twenty-fourth session".)
Liveness is the pipe itself: each side holds only its own end, so if either process dies the other
reads EOF. The server then fails every waiting request; the child stops (no orphan engine).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from pagoda.engine.config import EngineConfig
from pagoda.engine.core_client import DeadCallback, OutputsCallback
from pagoda.engine.engine_core import (
    IDLE_POLL_S,
    EngineCommand,
    EngineCore,
    EngineInfo,
    WireOutputs,
)
from pagoda.engine.llm_engine import EngineStats

log = logging.getLogger(__name__)


@dataclass
class EngineReady:
    info: EngineInfo
    stats: EngineStats
    load_seconds: float


@dataclass
class EngineFailed:
    error: str


class ProcessCoreClient:
    """The server side of the pipe (see the module docstring)."""

    def __init__(self, process: BaseProcess, conn: Connection, ready: EngineReady):
        self.info = ready.info
        self.initial_stats = ready.stats
        self.process = process
        self._conn = conn
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # reading the pipe, once started
        self._on_outputs: OutputsCallback | None = None
        self._on_dead: DeadCallback | None = None
        self._stopping = False
        self._error: str | None = None

    @classmethod
    def launch(cls, config: EngineConfig) -> ProcessCoreClient:
        """Spawn the engine process and block until its model is loaded (or it fails)."""
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads
        conn, child_conn = ctx.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()
        process = ctx.Process(target=run_engine_process, args=(config, child_conn, level),
                              name="pagoda-engine", daemon=True)
        process.start()
        child_conn.close()  # the child's end lives only in the child: its death reads as EOF
        log.info("engine process %d started; loading the model", process.pid)
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
        if not isinstance(message, EngineReady):
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
            reason = message.error if isinstance(message, EngineFailed) else \
                f"the engine process exited while loading (exit code {process.exitcode})"
            raise RuntimeError(reason)
        log.info("engine process %d ready (model loaded in %.1f s)", process.pid,
                 message.load_seconds)
        return cls(process, conn, message)

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputsCallback,
              on_dead: DeadCallback) -> None:
        """Read the pipe on `loop` from now on (`start` runs on the loop's thread)."""
        self._loop, self._on_outputs, self._on_dead = loop, on_outputs, on_dead
        fd = self._conn.fileno()
        loop.add_reader(fd, self._read)
        # uvloop (libuv's poll handle) makes a watched descriptor non-blocking; a Connection's
        # framing needs whole reads and writes (a partial read loses the message boundary, a
        # partial write would drop a command), and only readiness is wanted from the loop
        os.set_blocking(fd, True)

    def send(self, command: EngineCommand) -> None:
        with self._send_lock:
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # the engine is gone; the reader reports it
                pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop, then make sure the process is gone."""
        self._stopping = True
        self.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("engine process %d did not stop in %.0f s; killing it",
                        self.process.pid, timeout)
            self.process.kill()
            self.process.join(5)
        self._stop_reading()
        self._conn.close()

    @property
    def error(self) -> str | None:
        if self._error is None and not self._stopping and self._loop is not None \
                and not self.process.is_alive():
            return f"the engine process exited (exit code {self.process.exitcode})"
        return self._error

    def _read(self) -> None:
        """One message from the pipe (the loop calls this while it is readable: one message a
        call, as `Connection.poll` builds a selector each time it is asked). The engine writes
        each message whole, so a readable pipe never leaves recv() waiting long."""
        assert self._on_outputs is not None and self._on_dead is not None
        reason = None
        try:
            message = self._conn.recv()
            if not isinstance(message, EngineFailed):
                self._on_outputs(message)
                return
            reason = message.error
        except (EOFError, OSError):
            pass
        self._stop_reading()
        if self._stopping:
            return
        if reason is None:
            self.process.join(1)  # EOF: the process is exiting (or gone); name its exit code
            reason = f"the engine process exited (exit code {self.process.exitcode})"
        self._error = reason
        self._on_dead(reason)

    def _stop_reading(self) -> None:
        """Take the pipe off the loop's readers, from the loop's thread or any other (a Ray
        replica is shut down from another thread): the selector is the loop's alone."""
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        fd = self._conn.fileno()
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or not loop.is_running():
            loop.remove_reader(fd)
            return
        removed = threading.Event()

        def remove() -> None:
            loop.remove_reader(fd)
            removed.set()

        try:
            loop.call_soon_threadsafe(remove)
        except RuntimeError:  # the loop closed meanwhile, and its selector with it
            return
        removed.wait(5)


def run_engine_process(config: EngineConfig, conn: Connection, log_level: int) -> None:
    """The child's entry point: load, report, then serve commands until told to stop."""
    # Ctrl-C reaches the whole process group; the server decides when the engine stops (after
    # draining in-flight requests), so the engine ignores it. SIGTERM keeps its default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s "
                                                "[engine %(process)d]: %(message)s")
    from pagoda.engine.engine_factory import build_engine

    start = time.perf_counter()
    log.info("loading model %s", config.model or "(default)")
    try:
        engine = build_engine(config)
    except Exception as exc:
        log.exception("model loading failed")
        conn.send(EngineFailed(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    info = EngineInfo.of(engine)
    log.info("loaded %s in %.1f s: max_model_len %d, %d KV blocks of %d tokens (%s)",
             info.model_path, time.perf_counter() - start, info.max_model_len,
             info.validator.num_blocks, info.validator.block_size,
             engine.config.resolved_kv_dtype)
    conn.send(EngineReady(info, engine.stats(), time.perf_counter() - start))

    commands: queue.Queue[EngineCommand] = queue.Queue()
    # the stepping thread is the only writer
    wire = WireOutputs()
    core = EngineCore(engine, commands, lambda batch: conn.send(wire(batch)))
    failed = threading.Event()

    def step_loop() -> None:
        try:
            core.run()
        except BaseException as exc:
            log.exception("engine loop failed")
            failed.set()
            try:
                conn.send(EngineFailed(f"{type(exc).__name__}: {exc}"))
            except OSError:
                pass

    def read_commands() -> None:
        while not failed.is_set():
            try:
                if not conn.poll(IDLE_POLL_S):
                    continue
                command = conn.recv()
            except (EOFError, OSError):  # the server is gone: stop rather than linger
                command = None
            commands.put(command)
            if command is None:
                return

    # The engine steps on the process's main thread and the commands arrive on a helper: an
    # OpenMP region our C++ kernels start from any other thread costs ~120 us more (a 4-bit
    # decode GEMV measured 25 us on the main thread, 145 us on a second one; Zen 4, 2 threads),
    # which made batch-1 decode 3x slower than offline.
    reader = threading.Thread(target=read_commands, name="pagoda-commands", daemon=True)
    reader.start()
    step_loop()
    log.info("engine process stopped after %d steps", core.num_steps)
    sys.exit(1 if failed.is_set() else 0)
