"""Two real `pagoda serve` replicas behind the gateway: prefix-aware routing keeps a shared-prefix
workload on one replica, whose prefix cache then hits (read from the replicas' own /metrics).

The replicas run with `--api-key`, so every request, stream and WebSocket also shows that the
gateway sends each upstream its own key (from `api_key_env`), not the client's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.gateway.gateway_harness import GatewayServer, auth, free_port, make_config, wait_for

UPSTREAM_KEY = "replica-secret"
KEY_ENV = "PAGODA_TEST_UPSTREAM_KEY"
SYSTEM = ("You are a helpful assistant for the Pagoda project. You answer questions about serving "
          "large language models briefly and precisely, and you cite numbers when you can.")


def prefix_counters(url: str) -> tuple[float, float]:
    """(prefix-cache queries, hits) in tokens, from a replica's Prometheus text."""
    text = httpx.get(url + "/metrics", timeout=10).text

    def value(name: str) -> float:
        match = re.search(rf"^pagoda:{name}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        assert match, f"pagoda:{name}_total missing from {url}/metrics"
        return float(match.group(1))

    return value("prefix_cache_queries"), value("prefix_cache_hits")


def upstreams(urls: list[str]) -> list[dict[str, str]]:
    return [{"url": url, "api_key_env": KEY_ENV} for url in urls]


@pytest.fixture(scope="module")
def replica_processes():
    """Two ready `pagoda serve` replicas as (url, process); the last test kills one."""
    os.environ[KEY_ENV] = UPSTREAM_KEY  # read by the gateway config when it is parsed
    pagoda = Path(sys.executable).with_name("pagoda")
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            # the engine in the server's thread: one process per replica to start (what the
            # gateway sees is the same HTTP API; the engine process has its own tests)
            [str(pagoda), "serve", "--port", str(port), "--served-model-name", "m",
             "--engine-thread", "--api-key", UPSTREAM_KEY,
             "--kv-cache-memory", str(32 << 20), "--max-num-seqs", "4", "--num-threads", "1",
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")

    def ready(url: str, proc: subprocess.Popen) -> bool:
        assert proc.poll() is None, f"pagoda serve at {url} exited with {proc.returncode}"
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_for(lambda url=url, proc=proc: ready(url, proc), timeout=300, interval=0.5)
        yield list(zip(urls, procs, strict=True))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def serve_replicas(replica_processes):
    return [url for url, _ in replica_processes]


@pytest.mark.slow
def test_prefix_routing_hits_one_real_replicas_prefix_cache(serve_replicas):
    config = make_config({"m": upstreams(serve_replicas)}, policy="prefix",
                         cache={"enabled": False})
    before = [prefix_counters(url) for url in serve_replicas]
    with GatewayServer(config) as gw:
        for i in range(5):
            r = httpx.post(gw.url + "/v1/chat/completions", headers=auth(), timeout=120, json={
                "model": "m", "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Question number {i}: why batch?"}]})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "m"
    after = [prefix_counters(url) for url in serve_replicas]
    queries = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    hits = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    owner = max(range(2), key=lambda i: queries[i])
    assert queries[1 - owner] == 0, (queries, hits)  # the other replica saw no prompt at all
    # the shared system prompt is > 2 KV blocks (16 tokens each): requests 2..5 hit them
    assert hits[owner] >= 4 * 32, (queries, hits)
    assert hits[1 - owner] == 0


@pytest.mark.slow
def test_websocket_and_sse_through_the_gateway_to_a_real_replica(serve_replicas):
    config = make_config({"m": upstreams(serve_replicas[:1])}, cache={"enabled": False})
    with GatewayServer(config) as gw:
        ws_url = gw.url.replace("http", "ws") + "/v1/ws?model=m"
        with ws_connect(ws_url, additional_headers=auth()) as ws:
            ws.send(json.dumps({"type": "completion", "id": "a", "model": "m",
                                "prompt": "The capital of France is", "max_tokens": 3}))
            kinds = []
            while not kinds or kinds[-1] not in ("done", "error"):
                message = json.loads(ws.recv(timeout=120))
                assert message["id"] == "a"
                kinds.append(message["type"])
        assert kinds[0] == "start" and kinds[-1] == "done" and "delta" in kinds
        with httpx.stream("POST", gw.url + "/v1/completions", headers=auth(), timeout=120,
                          json={"model": "m", "prompt": "Once upon a time", "max_tokens": 4,
                                "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert all("usage" not in json.loads(line[6:]) or json.loads(line[6:])["usage"] is None
                   for line in lines[:-1])  # the usage chunk the gateway asked for was dropped
        tokens = gw.state.metrics.registry.get_sample_value(
            "pagoda:gateway_tokens_total",
            {"key": "alice", "model": "m", "upstream": serve_replicas[0][7:],
             "kind": "completion"})
        assert tokens == 4  # counted from the SSE stream's usage chunk


@pytest.mark.slow
def test_structured_output_and_tools_through_the_gateway_and_its_cache(serve_replicas):
    config = make_config({"m": upstreams(serve_replicas[:1])}, cache={"enabled": True})
    ask = [{"role": "user", "content": "Reply in JSON: what is the capital of France?"}]

    def fmt(*names: str) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {n: {"type": "string", "maxLength": 20}
                                             for n in names}, "required": list(names)}}}

    with GatewayServer(config) as gw, httpx.Client(base_url=gw.url, headers=auth(),
                                                   timeout=120) as http:
        body = {"model": "m", "messages": ask, "temperature": 0, "max_tokens": 60}
        first = http.post("/v1/chat/completions", json={**body, "response_format": fmt("city")})
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        assert list(json.loads(first.json()["choices"][0]["message"]["content"])) == ["city"]
        again = http.post("/v1/chat/completions", json={**body, "response_format": fmt("city")})
        assert again.headers["x-cache"] == "hit" and again.json() == first.json()
        other = http.post("/v1/chat/completions",
                          json={**body, "response_format": fmt("country", "city")})
        assert other.headers["x-cache"] == "miss"
        assert list(json.loads(other.json()["choices"][0]["message"]["content"])) == [
            "country", "city"]
        bad = http.post("/v1/chat/completions", json={**body, "guided_regex": "[a-"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"q": {"type": "string", "maxLength": 20}},
            "required": ["q"]}}}]
        call = http.post("/v1/chat/completions", json={**body, "tools": tools,
                                                       "tool_choice": "required"})
        choice = call.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "lookup"


@pytest.mark.slow
def test_responses_and_anthropic_messages_through_the_gateway(serve_replicas):
    config = make_config({"m": upstreams(serve_replicas[:1])}, cache={"enabled": True})
    anthropic_headers = {"x-api-key": auth()["Authorization"].split()[1]}
    with GatewayServer(config) as gw, httpx.Client(base_url=gw.url, timeout=120) as http:
        msg = http.post("/v1/messages", headers=anthropic_headers, json={
            "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert msg.status_code == 200 and msg.json()["type"] == "message"
        assert msg.headers["x-cache"] == "bypass"  # temperature 1, no seed: not cacheable
        greedy = {"model": "m", "max_tokens": 4, "temperature": 0,
                  "messages": [{"role": "user", "content": "Hello"}]}
        first = http.post("/v1/messages", headers=anthropic_headers, json=greedy)
        again = http.post("/v1/messages", headers=anthropic_headers, json=greedy)
        assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
        assert again.json() == first.json()
        def completion_tokens() -> float:
            return gw.state.metrics.registry.get_sample_value(
                "pagoda:gateway_tokens_total",
                {"key": "alice", "model": "m", "upstream": serve_replicas[0][7:],
                 "kind": "completion"}) or 0

        before = completion_tokens()
        with http.stream("POST", "/v1/messages", headers=anthropic_headers,
                         json={**greedy, "stream": True}) as r:  # a stream never hits the cache
            assert r.headers["x-cache"] == "bypass"
            lines = list(r.iter_lines())
        events = [line for line in lines if line.startswith("event: ")]
        assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
        start = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert start["message"]["model"] == "m"  # the public name, as in JSON answers
        # relayed event by event (it was buffered), its usage counted (it was not)
        assert completion_tokens() == before + 4
        resp = http.post("/v1/responses", headers=auth(), json={
            "model": "m", "input": "Hi", "max_output_tokens": 4})
        assert resp.status_code == 200 and resp.json()["object"] == "response"
        with http.stream("POST", "/v1/responses", headers=auth(), json={
                "model": "m", "input": "Hi", "max_output_tokens": 4, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("event: ")]
        assert events[0] == "event: response.created"
        assert events[-1] == "event: response.incomplete"  # cut by max_output_tokens
        assert completion_tokens() == before + 12  # + the JSON reply, + response.usage
        bad = http.post("/v1/responses", headers=auth(), json={"model": "m", "input": "Hi",
                                                               "store": True})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "store"
        tokens = gw.state.metrics.registry.get_sample_value(
            "pagoda:gateway_tokens_total",
            {"key": "alice", "model": "m", "upstream": serve_replicas[0][7:],
             "kind": "prompt"})
        assert tokens and tokens > 0  # counted from the replies' own usage shapes


@pytest.mark.slow
def test_replica_sigkilled_under_load_fails_no_request(replica_processes):
    """Runs last in this module: it kills a replica. 8 clients send 48 non-streaming requests
    over both replicas; one replica is SIGKILLed with requests in flight on it. Every request
    still answers 200 (the gateway retries connection failures on the survivor, which then
    takes all the traffic), and the gateway's health checks mark the victim down."""
    (url0, _), (victim_url, victim) = replica_processes
    config = make_config({"m": upstreams([url0, victim_url])}, policy="least_outstanding",
                         cache={"enabled": False})
    statuses: list[int] = []
    with GatewayServer(config) as gw:
        def one(i: int) -> None:
            r = httpx.post(gw.url + "/v1/completions", headers=auth(), timeout=120, json={
                "model": "m", "prompt": f"Request {i}: the river", "max_tokens": 12,
                "ignore_eos": True, "temperature": 0})
            statuses.append(r.status_code)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(48)]
            wait_for(lambda: len(statuses) >= 8, timeout=120, interval=0.02)
            victim.kill()  # SIGKILL: no drain, sockets reset
            for f in futures:
                f.result()
        metric = gw.state.metrics.registry.get_sample_value
        labels = {"model": "m", "upstream": victim_url[7:]}
        retried = metric("pagoda:gateway_retries_total", labels)
        wait_for(lambda: metric("pagoda:gateway_upstream_healthy", labels) == 0, timeout=10)
    assert statuses.count(200) == 48, statuses
    assert victim.wait(timeout=10) == -9
    assert retried and retried >= 1  # requests in flight on the victim were retried
