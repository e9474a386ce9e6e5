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
from pagoda.engine.engine_core import EngineCoreOutputs, without_prompts
from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.sampling.params import SamplingParams

CONFIG = EngineConfig(kv_cache_memory=64 << 20, progress=False)


def test_without_prompts_drops_only_the_prompt():
    out = RequestOutput("r", "a prompt", list(range(2000)),
                        [CompletionOutput(0, " x", [7], None, None, None, 1)])
    stats = EngineStats(1, 0, 0.5, 10, 0, 0, 0)
    slim = without_prompts(EngineCoreOutputs([out], stats))
    assert slim.stats == stats
    assert slim.outputs[0] == dataclasses.replace(out, prompt=None, prompt_token_ids=[])
    assert out.prompt_token_ids == list(range(2000))  # the engine's own output untouched


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
