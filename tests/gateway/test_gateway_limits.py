"""Per-key limits over HTTP, with the in-memory backend and with a real Redis, and two gateway
instances sharing limits and the response cache through Redis."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid

import httpx
import pytest
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from pagoda.gateway.rate_limit import Limits
from pagoda.gateway.redis_state import RedisRateLimiter
from tests.gateway.gateway_harness import (
    KEY_ALICE,
    KEY_BOB,
    GatewayServer,
    auth,
    make_config,
    start_redis,
    wait_for,
)

BACKENDS = ["memory", "redis"]


def gateway(replicas, request, backend: str, **overrides) -> GatewayServer:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    return GatewayServer(make_config({"m": [replicas[0].url]}, **overrides), redis_url=redis_url)


def post(url: str, key_headers=None, **body) -> httpx.Response:
    body = {"model": "m", "prompt": "one two", "max_tokens": 8, **body}
    return httpx.post(url + "/v1/completions", json=body, headers=key_headers or auth())


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_per_minute(replicas, request, backend):
    with gateway(replicas, request, backend, alice={"requests_per_minute": 5}) as gw:
        statuses = [post(gw.url).status_code for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        r = post(gw.url)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 40 <= int(r.headers["retry-after"]) <= 60  # the oldest request leaves the window
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert post(gw.url, auth(KEY_BOB)).status_code == 200  # other keys are unaffected
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'pagoda:gateway_rate_limited_total{key="alice",limit="requests"} 3.0' in metrics
    assert replicas[0].stats()["requests"] == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_remaining_headers_count_down(replicas, request, backend):
    with gateway(replicas, request, backend, alice={"requests_per_minute": 3}) as gw:
        left = [post(gw.url).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert left == ["2", "1", "0"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_per_minute(replicas, request, backend):
    # each request: 2 prompt + 8 completion = 10 tokens; with 35/min, requests 1-4 are admitted
    # (0, 10, 20, 30 used at admission) and the 5th is refused: one request's worth of overshoot
    with gateway(replicas, request, backend, alice={"tokens_per_minute": 35}) as gw:
        statuses = [post(gw.url).status_code for _ in range(6)]
        assert statuses == [200] * 4 + [429] * 2
        r = post(gw.url)
        assert r.headers["x-ratelimit-limit-tokens"] == "35"
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_usage_counts_toward_tokens(replicas, request, backend):
    with gateway(replicas, request, backend, alice={"tokens_per_minute": 15}) as gw:
        for expected in (200, 200, 429):
            with httpx.stream("POST", gw.url + "/v1/completions", headers=auth(), json={
                    "model": "m", "prompt": "one two", "max_tokens": 8, "stream": True}) as r:
                r.read()
                assert r.status_code == expected


@pytest.mark.parametrize("backend", BACKENDS)
async def test_max_concurrent(replicas, request, backend):
    replicas[0].control(delay_s=1.0)
    with gateway(replicas, request, backend, alice={"max_concurrent": 2}) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            async def one(i: int) -> httpx.Response:
                await asyncio.sleep(0.05 * i)  # stagger so the first two are surely in flight
                return await client.post(gw.url + "/v1/completions", headers=auth(),
                                         json={"model": "m", "prompt": "x", "max_tokens": 2})

            results = await asyncio.gather(*(one(i) for i in range(5)))
            assert sorted(r.status_code for r in results) == [200, 200, 429, 429, 429]
            assert all(r.headers["retry-after"] == "1" for r in results if r.status_code == 429)
            # slots come back when requests finish, streams included
            replicas[0].control(delay_s=0)
            ok = await client.post(gw.url + "/v1/completions", headers=auth(),
                                   json={"model": "m", "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_back_to_back_streams_within_max_concurrent_are_admitted(replicas, request, backend):
    # a stream's slot is free once its client has read [DONE], even while the upstream (here
    # lingering 1 s after [DONE]) has not closed the stream yet
    replicas[0].control(linger_s=1.0)
    with gateway(replicas, request, backend, alice={"max_concurrent": 1}) as gw:
        for _ in range(2):
            with httpx.stream("POST", gw.url + "/v1/completions", headers=auth(), json={
                    "model": "m", "prompt": "x", "max_tokens": 3, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # held, not broken out of: that would close the stream
                while next(lines) != "data: [DONE]":
                    pass
                r2 = post(gw.url)  # while the first stream is still open
                assert r2.status_code == 200, r2.text
                assert list(lines) == [""]  # the stream then ends normally


async def test_two_gateways_share_limits_and_cache_through_redis(replicas, redis_url):
    config = make_config({"m": [replicas[0].url]}, alice={"requests_per_minute": 6})
    with GatewayServer(config, redis_url) as a, GatewayServer(config, redis_url) as b:
        statuses = [post(gw.url, temperature=0.5).status_code for gw in (a, b, a, b, a, b, a, b)]
        assert statuses == [200] * 6 + [429] * 2
    config = make_config({"m": [replicas[0].url]}, alice={"max_concurrent": 1})
    replicas[0].control(delay_s=1.0)
    with GatewayServer(config, redis_url) as a, GatewayServer(config, redis_url) as b:
        async with httpx.AsyncClient(timeout=10) as client:
            body = {"model": "m", "prompt": "x", "max_tokens": 2}
            slow = asyncio.create_task(client.post(a.url + "/v1/completions", json=body,
                                                   headers=auth()))
            await asyncio.sleep(0.3)
            r = await client.post(b.url + "/v1/completions", json=body, headers=auth())
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert (await slow).status_code == 200
            replicas[0].control(delay_s=0)
            assert (await client.post(b.url + "/v1/completions", json=body,
                                      headers=auth())).status_code == 200
    config = make_config({"m": [replicas[0].url]})
    with GatewayServer(config, redis_url) as a, GatewayServer(config, redis_url) as b:
        first = post(a.url, temperature=0, prompt="cache me")
        second = post(b.url, temperature=0, prompt="cache me")
        assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
        assert first.json() == second.json()
    before = replicas[0].stats()["requests"]
    assert before == 6 + 2 + 1  # the hit never reached the upstream


def test_redis_outage_degrades_cache_and_refuses_with_503(replicas):
    proc, url = start_redis()
    try:
        config = make_config({"m": [replicas[0].url]}, alice={"requests_per_minute": 100})
        with GatewayServer(config, url) as gw:
            assert post(gw.url, temperature=0).headers["x-cache"] == "miss"
            assert post(gw.url, temperature=0).headers["x-cache"] == "hit"
            proc.kill()
            proc.wait(timeout=10)
            r = post(gw.url, temperature=0)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "state_backend_unavailable"
            # a WebSocket is refused at the handshake, as a rate-limited one is (the error
            # escaped the handler: a 500)
            ws_url = gw.url.replace("http", "ws", 1) + "/v1/ws?model=m"
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(ws_url, additional_headers=auth(KEY_ALICE))
            assert refused.value.response.status_code == 403
    finally:
        if proc.poll() is None:
            proc.kill()
    assert replicas[0].stats()["requests"] == 1


def test_redis_killed_and_restarted_under_load(replicas):
    """Redis SIGKILLed while four clients keep sending, then restarted on the same port: every
    answer is a 200 or the documented 503 (with Retry-After), never another error; a key
    without limits is served throughout; limited keys are served again without a gateway
    restart."""
    proc, url = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    answers: list[tuple[float, str, int, str | None]] = []  # (time, key, status, error code)
    stop = threading.Event()

    def client(key: str, name: str) -> None:
        with httpx.Client(timeout=20, headers=auth(key)) as http:
            for i in itertools.count():
                if stop.is_set():
                    return
                r = http.post(gw.url + "/v1/completions", json={
                    "model": "m", "prompt": f"{name} {i % 5}", "max_tokens": 2,
                    "temperature": 0})
                code = None if r.status_code == 200 else r.json()["error"]["code"]
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "1"
                answers.append((time.monotonic(), name, r.status_code, code))

    def count(since: float, name: str, status: int) -> int:
        return sum(1 for t, n, s, _ in answers if t > since and n == name and s == status)

    config = make_config({"m": [replicas[0].url]}, alice={"requests_per_minute": 100_000})
    with GatewayServer(config, url) as gw:
        threads = [threading.Thread(target=client, args=(key, f"{name}{i}"), daemon=True)
                   for i in range(2) for key, name in ((KEY_ALICE, "alice"), (KEY_BOB, "bob"))]
        try:
            for t in threads:
                t.start()
            start = time.monotonic()
            wait_for(lambda: count(start, "alice0", 200) >= 10, timeout=30)
            proc.kill()  # SIGKILL: connections drop mid-command, nothing is flushed
            proc.wait(timeout=10)
            killed = time.monotonic()
            wait_for(lambda: count(killed, "alice0", 503) >= 5, timeout=30)
            proc, _ = start_redis(port)  # empty: limits and cache start afresh
            restarted = time.monotonic()
            wait_for(lambda: count(restarted, "alice0", 200) >= 10, timeout=30)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            proc.kill()
    outcomes = {(s, c) for _, _, s, c in answers}
    assert outcomes == {(200, None), (503, "state_backend_unavailable")}, outcomes
    assert not any(s != 200 for _, n, s, _ in answers if n.startswith("bob"))  # no limits
    assert count(killed, "bob0", 200) > 0 and count(restarted, "alice1", 200) > 0


async def test_redis_limiter_keeps_a_running_token_sum(redis_url):
    client = Redis.from_url(redis_url)
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    limiter = RedisRateLimiter(client, prefix)
    limits = Limits(tokens_per_minute=100)
    try:
        for i, n in enumerate((30, 25, 40)):
            assert (await limiter.acquire("k", limits, f"l{i}")).allowed
            await limiter.record_tokens("k", f"l{i}", n)
        decision = await limiter.acquire("k", limits, "l3")
        assert decision.allowed and decision.num_tokens == 95
        await limiter.record_tokens("k", "l3", 10)
        await client.delete(f"{prefix}rl:k:sum")  # a lost sum is recounted from the events
        decision = await limiter.acquire("k", limits, "l4")
        assert not decision.allowed and decision.reason == "tokens"
        assert decision.num_tokens == 105 and 59 < decision.reset_tokens_s <= 60
        assert int(await client.get(f"{prefix}rl:k:sum")) == 105
    finally:
        await client.aclose()
