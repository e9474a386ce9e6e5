"""A dead engine must fail its waiting requests with an error (never hang them) and turn /health
into 503, whether the engine loop ran in a thread or in an engine process."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil

from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.core_client import ThreadCoreClient
from pagoda.server.app import build_app
from pagoda.server.config import ServerConfig
from pagoda.server.engine_client import EngineClient
from tests.server.server_process import ServerProcess

LONG = {"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True}


async def test_dead_engine_thread(make_engine):
    """In-process: the engine thread raises on its third step."""
    engine = make_engine()
    real_step, num_steps = engine.step, 0

    def failing_step():
        nonlocal num_steps
        num_steps += 1
        if num_steps == 3:
            raise RuntimeError("injected step failure")
        return real_step()

    engine.step = failing_step
    client = EngineClient(ServerConfig())
    client.llm, client.status = AsyncLLM(ThreadCoreClient(engine)), "ok"
    client.llm.start()
    transport = httpx.ASGITransport(app=build_app(client.config, client=client))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://pagoda") as http:
            assert (await http.get("/health")).status_code == 200
            r = await http.post("/v1/completions", json=LONG)
            assert r.status_code == 500, r.text
            assert "injected step failure" in r.json()["error"]["message"]
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            assert "injected step failure" in health.json()["detail"]
            r = await http.post("/v1/completions", json=LONG)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        client.shutdown()


def test_killed_engine_process():
    """A real `--engine-process` server whose engine child is SIGKILLed mid-request."""
    srv = ServerProcess("--engine-process")
    try:
        srv.wait_ready()
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        engine = next(p for p in children if "multiprocessing.spawn" in " ".join(p.cmdline()))
        result: dict[str, httpx.Response] = {}

        def non_streaming() -> None:
            with srv.client() as http:
                result["r"] = http.post("/v1/completions", json=LONG)

        waiter = threading.Thread(target=non_streaming)
        with srv.client() as http, http.stream("POST", "/v1/completions",
                                               json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            waiter.start()
            deadline = time.monotonic() + 30
            while srv.kv()["num_running"] + srv.kv()["num_waiting"] < 2:  # both in the engine
                assert time.monotonic() < deadline
                time.sleep(0.05)
            engine.send_signal(signal.SIGKILL)
            rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "engine_error"
        waiter.join(60)
        assert result["r"].status_code == 500
        assert "engine process exited" in result["r"].json()["error"]["message"]
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        with srv.client() as http:
            assert http.post("/v1/completions", json=LONG).status_code == 503
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 1  # a server whose engine failed exits non-zero
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        srv.stop()
