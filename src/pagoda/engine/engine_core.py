"""The engine's busy loop and the messages that cross into and out of it.

`EngineCore` owns an `LLMEngine` and is its only caller: it drains commands (add, abort), runs one
`step()`, and emits the outputs together with the counters as they stand after that step. The same
loop runs in a thread of the server process or in an engine process (`core_client.py`,
`engine_process.py`); only `emit` and the command source differ. All messages are plain,
picklable dataclasses of ids, ints and lists.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.request_validator import RequestValidator
from pagoda.loader.tokenizer import Tokenizer
from pagoda.models.config import ModelConfig
from pagoda.sampling.params import SamplingParams

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # an idle loop wakes this often to notice a stop request


@dataclass
class AddRequest:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | None  # None: an embedding request
    arrival_time: float  # time.monotonic(): one clock for every process on the machine


@dataclass
class AbortRequest:
    req_id: str
    reason: str = "abort"
    error: str | None = None


# What a front-end sends; None asks the loop to stop.
EngineCommand = AddRequest | AbortRequest | None


@dataclass
class EngineCoreOutputs:
    """One iteration's deltas and the counters after it (sent even with no deltas when the
    counters moved, e.g. an abort freed blocks, so /metrics and /debug/kv stay current)."""

    outputs: list[RequestOutput]
    stats: EngineStats


class WireOutputs:
    """The batches as they cross to a front-end process: each output without its prompt's text
    and ids, which the front-end sent and holds, and with a request's prompt log-probs only the
    first time they appear (the engine repeats them on every later output of the request). Both
    would otherwise be pickled with every token: a 2,000-token prompt made each message 15 KB,
    pickled and unpickled in ~60 us instead of ~20; its prompt log-probs, far more. AsyncLLM
    puts them back on every output it hands out."""

    def __init__(self) -> None:
        self._scored: set[str] = set()  # requests whose prompt log-probs have crossed

    def __call__(self, batch: EngineCoreOutputs) -> EngineCoreOutputs:
        outputs = []
        for o in batch.outputs:
            prompt_logprobs = o.prompt_logprobs
            if prompt_logprobs is not None:
                if o.req_id in self._scored:
                    prompt_logprobs = None
                else:
                    self._scored.add(o.req_id)
            if o.finished:
                self._scored.discard(o.req_id)
            outputs.append(dataclasses.replace(o, prompt=None, prompt_token_ids=[],
                                               prompt_logprobs=prompt_logprobs))
        return EngineCoreOutputs(outputs, batch.stats)


@dataclass(frozen=True)
class EngineInfo:
    """What a front-end needs from a loaded engine to tokenize, validate and describe it."""

    model_path: str
    model_config: ModelConfig
    tokenizer: Tokenizer
    validator: RequestValidator
    task: str = "generate"  # or "embed" (engine/embedding_engine.py)

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        return cls(engine.loaded.path, engine.model_config, engine.tokenizer, engine.validator,
                   engine.task)

    @property
    def max_model_len(self) -> int:
        return self.validator.max_model_len


class EngineCore:
    """Not thread-safe: `run` must be the only code touching the engine once it starts."""

    def __init__(self, engine: LLMEngine, commands: queue.Queue[EngineCommand],
                 emit: Callable[[EngineCoreOutputs], None]):
        self.engine = engine
        self.commands = commands
        self.emit = emit
        self.num_steps = 0

    def run(self, stop: threading.Event | None = None) -> None:
        """Step until a None command (or `stop`); an engine exception propagates to the caller,
        which must fail every request still waiting."""
        stop = stop or threading.Event()
        last_stats = self.engine.stats()
        while not stop.is_set():
            idle = not self.engine.has_unfinished_requests()
            outputs, stopping = self._apply_commands(block=idle)
            if stopping:
                stop.set()
            elif self.engine.has_unfinished_requests():
                outputs += self.engine.step()
                self.num_steps += 1
            stats = self.engine.stats()
            if outputs or stats != last_stats:
                self.emit(EngineCoreOutputs(outputs, stats))
                last_stats = stats

    def _apply_commands(self, block: bool) -> tuple[list[RequestOutput], bool]:
        """Apply every queued command; returns (outputs of refused/aborted requests, stop?)."""
        outputs: list[RequestOutput] = []
        try:
            cmd = self.commands.get(timeout=IDLE_POLL_S) if block else self.commands.get_nowait()
        except queue.Empty:
            return outputs, False
        while True:
            if cmd is None:
                return outputs, True
            if isinstance(cmd, AddRequest):
                try:
                    self.engine.add_tokenized_request(cmd.req_id, cmd.prompt, cmd.prompt_token_ids,
                                                      cmd.params, cmd.arrival_time)
                except ValueError as exc:  # the front-end validated; this is a late refusal
                    outputs.append(RequestOutput(cmd.req_id, cmd.prompt, cmd.prompt_token_ids,
                                                 [], True, None, str(exc)))
            elif isinstance(cmd, AbortRequest):
                out = self.engine.abort_request(cmd.req_id, cmd.reason, cmd.error)
                if out is not None:
                    outputs.append(out)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return outputs, False
