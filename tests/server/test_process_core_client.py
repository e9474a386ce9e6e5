"""`ProcessCoreClient` as `AsyncLLM` sees it: outputs read on the event loop (no reader thread),
sent without the prompt that the front-end already holds and handed back with it, and a shutdown
from another thread (as Ray stops a replica) while the loop runs; under asyncio's loop and under
uvloop (uvicorn's when installed), whose poll handles make a watched descriptor non-blocking."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading

import pytest
import uvloop

from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.config import EngineConfig
from pagoda.engine.engine_core import EngineCoreOutputs, WireOutputs
from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.sampling.params import SamplingParams

CONFIG = EngineConfig(kv_cache_memory=64 << 20, progress=False)


def test_wire_outputs_drop_the_prompt_and_send_prompt_logprobs_once():
    scored = [None, {5: -0.5}, {7: -1.0, 8: -2.0}]
    stats = EngineStats(1, 0, 0.5, 10, 0, 0, 0)

    def out(finished: bool = False, req_id: str = "r") -> RequestOutput:
        return RequestOutput(req_id, "a prompt", list(range(2000)),
                             [CompletionOutput(0, " x", [7], None, None, None, 1)], finished,
                             prompt_logprobs=scored)

    wire = WireOutputs()
    first = wire(EngineCoreOutputs([out(), out(req_id="s")], stats))
    assert first.stats == stats
    assert first.outputs[0] == dataclasses.replace(out(), prompt=None, prompt_token_ids=[])
    assert first.outputs[1].prompt_logprobs == scored  # each request's first time
    later = wire(EngineCoreOutputs([out(), out(finished=True)], stats))
    assert [o.prompt_logprobs for o in later.outputs] == [None, None]
    again = wire(EngineCoreOutputs([out()], stats))  # "r" finished: an id used anew
    assert again.outputs[0].prompt_logprobs == scored
    engine_side = out()
    wire(EngineCoreOutputs([engine_side], stats))
    assert engine_side.prompt_token_ids == list(range(2000))  # the engine's own output untouched


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_outputs_carry_the_prompt_and_match_the_offline_engine(loop_kind: str):
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(_generate_and_compare())
    finally:
        loop.close()


async def _generate_and_compare() -> None:
    llm = await asyncio.to_thread(AsyncLLM.from_config, CONFIG, True)
    llm.start()
    try:
        threads = {t.name for t in threading.enumerate()}
        assert "pagoda-engine-reader" not in threads  # the loop reads the pipe itself
        assert os.get_blocking(llm.core._conn.fileno())  # whole messages, whatever the loop
        texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

        async def run(text: str) -> list:
            return [o async for o in llm.generate(text, params)]

        # concurrent requests: several outputs a message, messages queued on the pipe
        runs = await asyncio.gather(*[run(t) for t in texts])
        # prompt log-probs cross once and come back on every output
        scored = [o async for o in llm.generate(texts[0], SamplingParams(
            temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2))]
        assert len(scored) >= 2 and scored[0].prompt_logprobs is not None
        assert len(scored[0].prompt_logprobs) == len(scored[0].prompt_token_ids)
        assert all(o.prompt_logprobs == scored[0].prompt_logprobs for o in scored)
        offline = LLMEngine(CONFIG)  # the same config in this process
        for text, outs in zip(texts, runs, strict=True):
            assert len(outs) >= 2 and outs[-1].finished
            ids = outs[0].prompt_token_ids
            assert ids and all(o.prompt == text and o.prompt_token_ids == ids for o in outs)
            offline.add_request(text, text, params)
        expected: dict[str, list[int]] = {t: [] for t in texts}
        while offline.has_unfinished_requests():
            for out in offline.step():
                expected[out.req_id] += out.outputs[0].token_ids
        for text, outs in zip(texts, runs, strict=True):
            assert [t for o in outs for t in o.outputs[0].token_ids] == expected[text]
    finally:
        # from a thread that is not the loop's while the loop runs (a Ray replica's stop)
        await asyncio.to_thread(llm.shutdown)
    assert not llm.core.process.is_alive()
    assert llm.error is None
