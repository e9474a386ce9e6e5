"""Load-balancing policies and virtual-model routing, observed at the fake replicas."""

from __future__ import annotations

import asyncio
import json

import httpx
from websockets.sync.client import connect as ws_connect

from tests.gateway.gateway_harness import GatewayServer, auth, make_config, wait_for

SYSTEM = "You are a meticulous assistant for the Pagoda project. Answer briefly and precisely. " * 3


def chat(gw: GatewayServer, system: str, question: str, model: str = "m") -> httpx.Response:
    body = {"model": model, "max_tokens": 3, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=auth(), timeout=10)


def counts(replicas) -> list[int]:
    return [u.stats()["requests"] for u in replicas]


def test_prefix_policy_sends_a_shared_prefix_workload_to_one_replica(replicas):
    config = make_config({"m": [u.url for u in replicas]}, policy="prefix")
    with GatewayServer(config) as gw:
        for i in range(30):
            assert chat(gw, SYSTEM, f"question {i}?").status_code == 200
        shared = counts(replicas)
        assert sorted(shared) == [0, 0, 30]
        for i in range(30):  # distinct prefixes spread over the pool
            assert chat(gw, f"system prompt variant {i}", "same question").status_code == 200
        spread = [c - s for c, s in zip(counts(replicas), shared, strict=True)]
        assert sum(spread) == 30 and sum(1 for c in spread if c > 0) >= 2


def test_prefix_policy_falls_back_when_the_owner_is_unhealthy(replicas):
    config = make_config({"m": [u.url for u in replicas]}, policy="prefix")
    with GatewayServer(config) as gw:
        chat(gw, SYSTEM, "first")
        owner = next(i for i, c in enumerate(counts(replicas)) if c == 1)
        replicas[owner].control(healthy=False)
        wait_for(lambda: not gw.state.pools["m"].upstreams[owner].healthy, timeout=5)
        for i in range(10):
            assert chat(gw, SYSTEM, f"q{i}").status_code == 200
        after = counts(replicas)
        assert after[owner] == 1
        assert sorted(after) == [0, 1, 10]  # one fallback replica takes the whole prefix
        replicas[owner].control(healthy=True)
        wait_for(lambda: gw.state.pools["m"].upstreams[owner].healthy, timeout=5)
        chat(gw, SYSTEM, "back home")
        assert counts(replicas)[owner] == 2


def test_round_robin_spreads_evenly(replicas):
    config = make_config({"m": [u.url for u in replicas]}, policy="round_robin")
    with GatewayServer(config) as gw:
        for i in range(9):
            chat(gw, SYSTEM, str(i))
    assert counts(replicas) == [3, 3, 3]


async def test_least_outstanding_avoids_the_busy_replica(replicas):
    replicas[0].control(delay_s=3.0)
    config = make_config({"m": [u.url for u in replicas]}, policy="least_outstanding")
    with GatewayServer(config) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            body = {"model": "m", "prompt": "x", "max_tokens": 2}
            slow = asyncio.create_task(
                client.post(gw.url + "/v1/completions", json=body, headers=auth()))
            wait = 0
            while replicas[0].stats()["requests"] == 0 and wait < 50:
                await asyncio.sleep(0.05)
                wait += 1
            for _ in range(8):  # sequential: r2 and r3 are idle, r1 still busy
                r = await client.post(gw.url + "/v1/completions", json=body, headers=auth())
                assert r.status_code == 200
            assert (await slow).status_code == 200
    assert counts(replicas) == [1, 4, 4]


def virtual_config(replicas):
    return make_config(
        {"small": [replicas[0].url], "large": [replicas[1].url]},
        virtual_models=[{"name": "auto", "default": "small", "rules": [
            {"model": "large", "min_prompt_chars": 300},
            {"model": "large", "min_max_tokens": 100},
            {"model": "large", "keywords": ["prove", "step by step"]},
        ]}],
    )


def test_virtual_model_routes_by_complexity_and_reports_the_choice(replicas):
    cases = [
        ("what is 2+2?", 3, "small"),
        ("x " * 200, 3, "large"),  # long prompt
        ("hi", 150, "large"),  # large max_tokens
        ("Please PROVE that sqrt 2 is irrational", 3, "large"),  # keyword, any case
    ]
    with GatewayServer(virtual_config(replicas)) as gw:
        for prompt, max_tokens, expected in cases:
            r = httpx.post(gw.url + "/v1/completions", headers=auth(), json={
                "model": "auto", "prompt": prompt, "max_tokens": max_tokens})
            assert r.status_code == 200
            assert r.headers["x-pagoda-routed-to"] == expected
            assert r.json()["model"] == expected
        ids = [m["id"] for m in httpx.get(gw.url + "/v1/models", headers=auth()).json()["data"]]
        assert ids == ["small", "large", "auto"]
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=auth(), json={
                "model": "auto", "stream": True, "max_tokens": 3,
                "messages": [{"role": "user", "content": "think step by step"}]}) as r:
            assert r.headers["x-pagoda-routed-to"] == "large"
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert chunks and all(c["model"] == "large" for c in chunks)
    assert replicas[0].stats()["models"] == ["small"]
    assert replicas[1].stats()["models"] == ["large"] * 4


def test_upstream_model_is_renamed_both_ways(replicas):
    pool = {"name": "m", "upstreams": [replicas[0].url], "upstream_model": "backend-7b"}
    config = make_config({"m": [replicas[0].url]}, models=[pool])
    with GatewayServer(config) as gw:
        r = httpx.post(gw.url + "/v1/completions", headers=auth(),
                       json={"model": "m", "prompt": "x", "max_tokens": 2})
    assert r.json()["model"] == "m"
    assert replicas[0].stats()["models"] == ["backend-7b"]


def test_upstream_model_is_renamed_in_websocket_messages(replicas):
    pool = {"name": "m", "upstreams": [replicas[0].url], "upstream_model": "backend-7b"}
    config = make_config({"m": [replicas[0].url]}, models=[pool])
    with GatewayServer(config) as gw, ws_connect(gw.url.replace("http", "ws") + "/v1/ws?model=m",
                                                 additional_headers=auth()) as ws:
        for sent, upstream_sees in (({"type": "chat", "id": 1, "model": "m"}, "backend-7b"),
                                    ({"type": "chat", "id": 2, "model": "other"}, "other"),
                                    ({"type": "chat", "id": 3}, None)):
            ws.send(json.dumps(sent))
            reply = json.loads(ws.recv(timeout=5))
            assert json.loads(reply["echo"]).get("model") == upstream_sees
            assert reply["query"] == {"model": "backend-7b"}
        ws.send("not json")  # passed through untouched
        assert json.loads(ws.recv(timeout=5))["echo"] == "not json"
