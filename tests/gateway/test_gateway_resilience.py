"""Retries, health checks, passive ejection and a replica killed under load."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.gateway.gateway_harness import (
    GatewayServer,
    auth,
    make_config,
    start_upstreams,
    wait_for,
)


def complete(gw: GatewayServer, **body) -> httpx.Response:
    body = {"model": "m", "prompt": "x", "max_tokens": 4, **body}
    return httpx.post(gw.url + "/v1/completions", json=body, headers=auth(), timeout=10)


def stream_lines(gw: GatewayServer, **body) -> tuple[httpx.Response, list[str]]:
    body = {"model": "m", "prompt": "x", "max_tokens": 4, "stream": True, **body}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=auth()) as r:
        return r, [line for line in r.iter_lines() if line]


def two(replicas, **overrides) -> GatewayServer:
    return GatewayServer(make_config({"m": [replicas[0].url, replicas[1].url]}, **overrides))


@pytest.mark.parametrize("mode", ["502", "503"])
def test_unavailable_replicas_and_connection_failures_retry_on_another(replicas, mode):
    replicas[0].control(fail_next=1, fail_mode=mode)
    with two(replicas) as gw:
        r = complete(gw)  # round robin starts at r1, which fails; r2 answers
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("[r2#1]")
        metrics = httpx.get(gw.url + "/metrics").text
    assert [u.stats()["requests"] for u in replicas[:2]] == [1, 1]
    assert "pagoda:gateway_retries_total" in metrics
    dead = "http://127.0.0.1:9"  # nothing listens there: connection refused
    with GatewayServer(make_config({"m": [dead, replicas[2].url]})) as gw:
        assert all(complete(gw).status_code == 200 for _ in range(4))
    assert replicas[2].stats()["requests"] == 4


def test_stream_failing_before_first_byte_is_retried(replicas):
    replicas[0].control(fail_next=1, fail_mode="early")
    with two(replicas) as gw:
        r, lines = stream_lines(gw)
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["text"] == "[r2#1]"
    assert [u.stats()["requests"] for u in replicas[:2]] == [1, 1]


def test_stream_failing_after_first_byte_is_not_retried(replicas):
    replicas[0].control(fail_next=1, fail_mode="midstream")
    with two(replicas) as gw:
        r, lines = stream_lines(gw, max_tokens=10)
    assert r.status_code == 200
    texts = [json.loads(line[6:]) for line in lines]
    assert [t["choices"][0]["text"] for t in texts[:2]] == ["[r1#1]", " w1"]
    assert texts[-1]["error"]["code"] == "upstream_failed"  # ends with an error, no [DONE]
    assert "data: [DONE]" not in lines
    assert [u.stats()["requests"] for u in replicas[:2]] == [1, 0]


def test_client_errors_are_not_retried(replicas):
    replicas[0].control(fail_next=1, fail_mode="400")
    with two(replicas) as gw:
        assert complete(gw).status_code == 400
        replicas[1].control(fail_next=1, fail_mode="400")
        r, _ = stream_lines(gw)
        assert r.status_code == 400
    assert [u.stats()["requests"] for u in replicas[:2]] == [1, 1]


def test_a_replicas_own_500_is_passed_through_unretried(replicas):
    replicas[0].control(fail_next=2, fail_mode="500")
    with two(replicas) as gw:
        r = complete(gw)
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "injected by r1"}}  # the upstream's own body
        replicas[1].control(fail_next=1, fail_mode="500")
        s, _ = stream_lines(gw)
        assert s.status_code == 500
    assert [u.stats()["requests"] for u in replicas[:2]] == [1, 1]


def test_all_replicas_overloaded_passes_the_last_503_through(replicas):
    for u in replicas:
        u.control(fail_next=5, fail_mode="503")
    config = make_config({"m": [u.url for u in replicas]}, retry={"max_attempts": 2})
    with GatewayServer(config) as gw:
        r = complete(gw)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["message"].startswith("injected by")
        s, _ = stream_lines(gw)
        assert s.status_code == 503 and s.headers["retry-after"] == "7"
    assert sum(u.stats()["requests"] for u in replicas) == 4


def test_no_replica_reachable_gives_502_after_max_attempts():
    dead = ["http://127.0.0.1:9", "http://127.0.0.1:7"]  # nothing listens: connection refused
    with GatewayServer(make_config({"m": dead}, retry={"max_attempts": 2})) as gw:
        r = complete(gw)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unavailable"


def test_passive_ejection_after_consecutive_failures(replicas):
    replicas[0].control(fail_next=100, fail_mode="503")
    config = make_config({"m": [replicas[0].url, replicas[1].url]},
                         health={"eject_after_failures": 2, "eject_s": 60})
    with GatewayServer(config) as gw:
        assert all(complete(gw).status_code == 200 for _ in range(10))
        assert gw.state.pools["m"].upstreams[0].ejected_until > 0
    assert replicas[0].stats()["requests"] == 2


def test_active_health_checks_take_replicas_out_and_back(replicas):
    with two(replicas) as gw:
        replicas[0].control(healthy=False)
        up = gw.state.pools["m"].upstreams[0]
        wait_for(lambda: not up.healthy, timeout=5)
        assert "0.0" in [line.split()[-1] for line in httpx.get(gw.url + "/metrics").text
                         .splitlines() if line.startswith("pagoda:gateway_upstream_healthy")]
        before = replicas[0].stats()["requests"]
        assert all(complete(gw).status_code == 200 for _ in range(6))
        assert replicas[0].stats()["requests"] == before
        health = httpx.get(gw.url + "/health")
        assert health.status_code == 200 and health.json()["upstreams"]["m"][up.name] is False
        replicas[1].control(healthy=False)  # none left: a readiness probe must see it
        other = gw.state.pools["m"].upstreams[1]
        wait_for(lambda: not other.healthy, timeout=5)
        health = httpx.get(gw.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        replicas[1].control(healthy=True)
        wait_for(lambda: other.healthy, timeout=5)
        replicas[0].control(healthy=True)
        wait_for(lambda: up.healthy, timeout=5)
        assert all(complete(gw).status_code == 200 for _ in range(6))
        assert replicas[0].stats()["requests"] == before + 3


@pytest.fixture
def doomed_replicas():
    upstreams = start_upstreams(["k1", "k2", "k3"])
    yield upstreams
    for u in upstreams:
        u.stop()


async def test_replica_killed_under_load_fails_no_request(doomed_replicas):
    for u in doomed_replicas:
        u.control(delay_s=0.05)
    config = make_config({"m": [u.url for u in doomed_replicas]}, policy="least_outstanding")
    victim = doomed_replicas[1]
    with GatewayServer(config) as gw:
        async with httpx.AsyncClient(timeout=20) as client:
            sem = asyncio.Semaphore(12)
            done = 0

            async def one(i: int) -> int:
                nonlocal done
                async with sem:
                    r = await client.post(gw.url + "/v1/completions", headers=auth(),
                                          json={"model": "m", "prompt": f"p{i}", "max_tokens": 2})
                    done += 1
                    return r.status_code

            async def killer() -> None:
                while done < 40:
                    await asyncio.sleep(0.01)
                victim.kill()  # SIGKILL with requests in flight to it

            results = await asyncio.gather(*(one(i) for i in range(150)), killer())
        retried = gw.state.metrics.registry.get_sample_value(
            "pagoda:gateway_retries_total", {"model": "m", "upstream": victim.url[7:]})
        assert retried >= 1  # requests were in flight to the victim, or sent to it, and retried
    statuses = results[:-1]
    assert statuses.count(200) == 150, statuses
    served = [u.stats()["requests"] for u in (doomed_replicas[0], doomed_replicas[2])]
    assert sum(served) > 150 - 40  # the survivors took over
