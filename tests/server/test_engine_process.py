"""`pagoda serve --engine-process`: the engine loop in a spawned child process.

The module's `server` fixture overrides the session's thread-mode server, so the tests imported
below run unchanged against the engine process: greedy completions and chat equal the offline
engine, streaming equals non-streaming, disconnects and WebSocket cancels free the KV blocks within
an engine step (the counters cross the process boundary), and /metrics carries the engine's
counters. Then process-specific checks: identical greedy text to the thread-mode server, and
SIGTERM exits 0 with no child left behind (runs last: it stops the server).
"""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import psutil
import pytest

from tests.server.server_process import ServerProcess, serving
from tests.server.test_openai_api import (  # noqa: F401  (collected again, against `server`)
    CHAT,
    test_chat_greedy_matches_offline,
    test_completion_greedy_matches_offline,
    test_health_was_503_while_loading,
    test_streaming_chat_equals_non_streaming,
)
from tests.server.test_streaming_load import (  # noqa: F401
    test_disconnect_mid_stream_frees_blocks,
    test_disconnect_non_streaming_frees_blocks,
    test_metrics_after_traffic,
)
from tests.server.test_websocket import test_concurrent_requests_and_cancel  # noqa: F401

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def server():
    with serving("--engine-process", "--max-waiting", "512") as proc:
        yield proc


def engine_children(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def test_engine_runs_in_a_spawned_child(server):
    cmdlines = [" ".join(p.cmdline()) for p in engine_children(server)]
    assert any("multiprocessing.spawn" in c for c in cmdlines), cmdlines


async def test_greedy_text_equals_thread_mode(server, thread_server):
    """The same requests, sent at once (one batch) to each server: identical greedy text."""

    async def texts(srv: ServerProcess) -> list[str]:
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=120) as http:

            async def complete(body: dict) -> str:
                r = await http.post("/v1/completions", json=body)
                return r.json()["choices"][0]["text"]

            async def stream(body: dict) -> str:
                text = ""
                async with http.stream("POST", "/v1/completions",
                                       json={**body, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                return text

            async def chat() -> str:
                r = await http.post("/v1/chat/completions", json={
                    "messages": CHAT, "max_tokens": 24, "temperature": 0})
                return r.json()["choices"][0]["message"]["content"]

            bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in PROMPTS]
            return await asyncio.gather(*[complete(b) for b in bodies],
                                        *[stream(b) for b in bodies], chat())

    got = await texts(server)
    assert got == await texts(thread_server)
    assert got[:len(PROMPTS)] == got[len(PROMPTS):-1]  # streamed == whole


def test_sigterm_exits_0_without_orphans(server):
    """Runs last in this module: it stops the server."""
    children = engine_children(server)
    assert children
    with server.client() as http, http.stream("POST", "/v1/completions", json={
            "prompt": "Count to ten:", "max_tokens": 16, "ignore_eos": True,
            "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"  # the in-flight request was drained, not cut
    assert server.proc.wait(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
