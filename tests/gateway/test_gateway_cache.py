"""The exact-match response cache: what is cached, hits and misses, streaming from cache, TTL."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.gateway.gateway_harness import GatewayServer, auth, make_config


def gateway(replicas, request, backend: str, **overrides) -> GatewayServer:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    return GatewayServer(make_config({"m": [replicas[0].url]}, **overrides), redis_url=redis_url)


def chat_body(**extra) -> dict:
    return {"model": "m", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "tell me a fact"}], **extra}


def post(gw: GatewayServer, body: dict) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=auth())


def stream(gw: GatewayServer, body: dict) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=auth(),
                      json={**body, "stream": True}) as r:
        return r, [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def streamed_text(payloads: list[str]) -> str:
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_deterministic_requests_hit_and_stream_from_cache(replicas, request, backend):
    with gateway(replicas, request, backend) as gw:
        first = post(gw, chat_body())
        assert first.headers["x-cache"] == "miss"
        second = post(gw, chat_body())
        assert second.headers["x-cache"] == "hit" and second.json() == first.json()
        r, payloads = stream(gw, chat_body())  # streaming request served from the cache
        assert r.headers["x-cache"] == "hit"
        assert r.headers["content-type"].startswith("text/event-stream")
        assert streamed_text(payloads) == first.json()["choices"][0]["message"]["content"]
        assert len(payloads) >= 4  # role chunk, content, finish chunk, [DONE]
        r, payloads = stream(gw, chat_body(stream_options={"include_usage": True}))
        assert json.loads(payloads[-2])["usage"] == first.json()["usage"]
        metrics = httpx.get(gw.url + "/metrics").text
    assert replicas[0].stats()["requests"] == 1
    assert 'pagoda:gateway_cache_lookups_total{model="m",result="hit"} 3.0' in metrics
    assert 'pagoda:gateway_cache_lookups_total{model="m",result="miss"} 1.0' in metrics


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_streamed_answer_is_cached_for_both_forms(replicas, request, backend):
    with gateway(replicas, request, backend) as gw:
        r, payloads = stream(gw, chat_body(seed=7, temperature=0.9))
        assert r.headers["x-cache"] == "miss"
        text = streamed_text(payloads)
        hit = post(gw, chat_body(seed=7, temperature=0.9))
        assert hit.headers["x-cache"] == "hit"
        assert hit.json()["choices"][0]["message"] == {"role": "assistant", "content": text}
        assert hit.json()["usage"]["completion_tokens"] == 6
        r, again = stream(gw, chat_body(seed=7, temperature=0.9))
        assert r.headers["x-cache"] == "hit" and streamed_text(again) == text
    assert replicas[0].stats()["requests"] == 1


def test_non_deterministic_and_different_requests_miss(replicas, request):
    with gateway(replicas, request, "memory") as gw:
        for _ in range(2):
            assert post(gw, chat_body(temperature=0.7)).headers["x-cache"] == "bypass"
        assert post(gw, {k: v for k, v in chat_body().items() if k != "temperature"}) \
            .headers["x-cache"] == "bypass"  # default temperature is 1
        assert post(gw, chat_body()).headers["x-cache"] == "miss"
        assert post(gw, chat_body(max_tokens=7)).headers["x-cache"] == "miss"
        r = httpx.post(gw.url + "/v1/completions", headers=auth(),
                       json={"model": "m", "prompt": "tell me a fact", "temperature": 0})
        assert r.headers["x-cache"] == "miss"
    assert replicas[0].stats()["requests"] == 6


def test_an_interrupted_stream_is_not_cached(replicas, request):
    replicas[0].control(fail_next=1, fail_mode="midstream")
    with gateway(replicas, request, "memory") as gw:
        r, payloads = stream(gw, chat_body(max_tokens=8))
        assert "[DONE]" not in payloads
        assert post(gw, chat_body(max_tokens=8)).headers["x-cache"] == "miss"


def test_entries_expire_after_ttl(replicas, request):
    with gateway(replicas, request, "memory", cache={"ttl_s": 0.5}) as gw:
        assert post(gw, chat_body()).headers["x-cache"] == "miss"
        assert post(gw, chat_body()).headers["x-cache"] == "hit"
        time.sleep(0.6)
        assert post(gw, chat_body()).headers["x-cache"] == "miss"
    assert replicas[0].stats()["requests"] == 2


def test_cache_can_be_disabled(replicas, request):
    with gateway(replicas, request, "memory", cache={"enabled": False}) as gw:
        assert [post(gw, chat_body()).headers["x-cache"] for _ in range(2)] == ["bypass"] * 2
