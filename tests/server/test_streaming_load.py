"""Streaming under load and client disconnects: blocks come back, every client is served."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai

from pagoda.sampling.params import SamplingParams

LONG = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 1500,
        "ignore_eos": True, "temperature": 0.8}


def test_disconnect_mid_stream_frees_blocks(server):
    assert server.wait_all_blocks_free()["num_free_blocks"] == server.kv()["num_total_blocks"]
    with server.client() as http, http.stream("POST", "/v1/completions",
                                              json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: {"):
                seen += 1
                if seen == 3:
                    break
        busy = server.kv()
        assert busy["num_running"] == 1 and busy["num_free_blocks"] < busy["num_total_blocks"]
    # the connection is closed: the engine must abort the request and free its blocks
    kv = server.wait_all_blocks_free(timeout=5)
    assert kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_running"] == 0


def test_disconnect_non_streaming_frees_blocks(server):
    start = time.monotonic()
    try:
        with server.client(timeout=httpx.Timeout(60, read=2.0)) as http:
            http.post("/v1/completions", json=LONG)
    except httpx.ReadTimeout:
        pass
    assert time.monotonic() - start < 30  # the long request was still running: we gave up
    kv = server.wait_all_blocks_free(timeout=5)
    assert kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_running"] == 0
    # the handler answers the departed client with its 499; no CancelledError escapes to
    # uvicorn (a cancelled gather of the prompts' results is not cancelled() itself)
    assert "Exception in ASGI application" not in server.log_tail(1 << 20)


def test_metrics_after_traffic(server):
    with server.client() as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                               "ignore_eos": True})
        assert r.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)

    def value(prefix: str) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix))

    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(f"pagoda:{name}_count") > 0, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert any(k.startswith(f"pagoda:{name}") for k in samples), name
    assert value("pagoda:prompt_tokens_total") > 0
    assert value("pagoda:generation_tokens_total") > 0
    assert value('pagoda:request_success_total{finished_reason="length"') > 0
    assert value("pagoda:kv_cache_usage_perc") == 0.0  # idle between tests


async def test_64_concurrent_streaming_clients(server, offline):
    prompts = [f"Question {i}: name a colour." for i in range(8)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key,
                                max_retries=0, timeout=300,
                                http_client=httpx.AsyncClient(
                                    limits=httpx.Limits(max_connections=100)))

    async def one(i: int) -> tuple[int, str, str | None, int]:
        stream = await client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompts[i % 8], max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, 0
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return i, text, finish, usage

    results = await asyncio.gather(*(one(i) for i in range(64)))
    await client.close()
    want = offline(prompts, SamplingParams(max_tokens=8, temperature=0))
    for i, text, finish, usage in results:
        assert text == want[i % 8], (i, text)
        assert finish in ("length", "stop") and 1 <= usage <= 8
    kv = server.wait_all_blocks_free()
    assert kv["num_free_blocks"] == kv["num_total_blocks"]


def test_sse_framing(server):
    with server.client() as http, http.stream(
            "POST", "/v1/completions",
            json={"prompt": "Hi", "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        assert line.startswith("data: ")
        assert json.loads(line[len("data: "):])["object"] == "text_completion"
