"""The per-input embedding cache on `/v1/embeddings`: partial hits, one entry for both encodings,
Redis shared by two gateways, per-model TTLs, hit/miss metrics, opt-out, Redis outage.

What reached the upstream is read from the fake replica's own record of every input it embedded
(`stats()["embedding_inputs"]`, in the order received)."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import pytest

from tests.gateway.fake_upstream import fake_vector
from tests.gateway.gateway_harness import GatewayServer, auth, make_config, start_redis

BACKENDS = ["memory", "redis"]
TEXTS = [f"sentence number {i} about caches" for i in range(10)]


def gateway(replicas, request, backend: str, pools=None, **overrides) -> GatewayServer:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    config = make_config(pools or {"e": [replicas[0].url]}, **overrides)
    return GatewayServer(config, redis_url=redis_url)


def embed(url: str, inputs, model: str = "e", headers=None, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"model": model, "input": inputs, **extra},
                      headers={**auth(), **(headers or {})}, timeout=30)


def vectors(r: httpx.Response) -> list[np.ndarray]:
    """The answer's vectors in order, float32, whichever encoding it used."""
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    assert all(d["object"] == "embedding" for d in data)
    out = []
    for d in data:
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str)
                   else np.asarray(e, dtype=np.float64).astype("<f4"))
    return out


def upstream_inputs(replica) -> list:
    return replica.stats()["embedding_inputs"]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_hits_send_only_the_misses_and_answer_all_in_order(replicas, request, backend):
    cached = [TEXTS[i] for i in (0, 1, 3, 4, 6, 7, 9)]
    with gateway(replicas, request, backend) as gw:
        first = embed(gw.url, cached)
        assert first.headers["x-cache"] == "miss" and first.headers["x-pagoda-cache-hits"] == "0"
        assert first.json()["usage"] == {"prompt_tokens": 35, "total_tokens": 35}
        assert upstream_inputs(replicas[0]) == cached
        r = embed(gw.url, TEXTS)
        assert r.headers["x-cache"] == "partial" and r.headers["x-pagoda-cache-hits"] == "7"
        # one upstream request holding exactly the three misses, in the client's order
        assert upstream_inputs(replicas[0])[7:] == [TEXTS[2], TEXTS[5], TEXTS[8]]
        assert replicas[0].stats()["embedding_requests"] == 2
        assert r.json()["model"] == "e" and r.json()["object"] == "list"
        assert r.json()["usage"] == {"prompt_tokens": 15, "total_tokens": 15}  # computed only
        got = vectors(r)
        assert same(got, [fake_vector(t) for t in TEXTS])
        uncached = embed(gw.url, TEXTS, headers={"Cache-Control": "no-store"})
        assert uncached.headers["x-cache"] == "bypass"
        assert same(got, vectors(uncached))  # bit-identical to an answer that skipped the cache
        full = embed(gw.url, TEXTS[::-1])
        assert full.headers["x-cache"] == "hit" and full.json()["usage"]["prompt_tokens"] == 0
        assert same(vectors(full), got[::-1])
    assert replicas[0].stats()["embedding_requests"] == 3  # the full hit never went upstream


def test_duplicate_inputs_are_computed_once(replicas, request):
    with gateway(replicas, request, "memory") as gw:
        r = embed(gw.url, ["a b", "c", "a b", "c", "d"])
        assert upstream_inputs(replicas[0]) == ["a b", "c", "d"]
        assert same(vectors(r), [fake_vector(t) for t in ["a b", "c", "a b", "c", "d"]])


def test_float_and_base64_are_served_from_one_entry(replicas, request):
    with gateway(replicas, request, "memory") as gw:
        as_float = embed(gw.url, "hello world")
        assert as_float.headers["x-cache"] == "miss"
        assert all(isinstance(x, float) for x in as_float.json()["data"][0]["embedding"])
        as_b64 = embed(gw.url, "hello world", encoding_format="base64")
        assert as_b64.headers["x-cache"] == "hit"
        assert isinstance(as_b64.json()["data"][0]["embedding"], str)
        assert same(vectors(as_float), vectors(as_b64))
        assert same(vectors(as_b64), [fake_vector("hello world")])
        assert replicas[0].stats()["embedding_formats"] == ["base64"]  # always asked in base64
        # token ids: one list is one input; a list of lists is several; "12" is not [12]
        assert embed(gw.url, [12, 13]).headers["x-cache"] == "miss"
        r = embed(gw.url, [[12, 13], [14]], encoding_format="base64")
        assert r.headers["x-cache"] == "partial"
        assert same(vectors(r), [fake_vector([12, 13]), fake_vector([14])])
        assert embed(gw.url, ["12 13"]).headers["x-cache"] == "miss"
        assert embed(gw.url, [[12]]).headers["x-cache"] == "miss"
    assert upstream_inputs(replicas[0]) == ["hello world", [12, 13], [14], "12 13", [12]]


def test_options_that_change_the_vector_are_in_the_key(replicas, request):
    with gateway(replicas, request, "memory") as gw:
        assert embed(gw.url, "x y z").headers["x-cache"] == "miss"
        truncated = embed(gw.url, "x y z", truncate_prompt_tokens=2)
        assert truncated.headers["x-cache"] == "miss"
        assert same(vectors(truncated), [fake_vector("x y z", 2)])
        assert embed(gw.url, "x y z", truncate_prompt_tokens=2).headers["x-cache"] == "hit"
        assert embed(gw.url, "x y z", user="someone").headers["x-cache"] == "hit"
        for _ in range(2):  # refused upstream: passed through, never cached
            r = embed(gw.url, "x y z", dimensions=4)
            assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert replicas[0].stats()["embedding_requests"] == 4


async def test_two_gateways_share_hits_through_redis(replicas, redis_url):
    config = make_config({"e": [replicas[0].url]})
    with GatewayServer(config, redis_url) as a, GatewayServer(config, redis_url) as b:
        first = embed(a.url, TEXTS[:4])
        second = embed(b.url, TEXTS[:4], encoding_format="base64")
        assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
        assert same(vectors(first), vectors(second))
        assert embed(a.url, TEXTS[:6]).headers["x-pagoda-cache-hits"] == "4"
        assert embed(b.url, TEXTS[:6]).headers["x-cache"] == "hit"
    assert upstream_inputs(replicas[0]) == TEXTS[:6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_expire_after_their_models_ttl(replicas, request, backend):
    pools = {"e": [replicas[0].url], "long": [replicas[1].url]}
    with gateway(replicas, request, backend, pools,
                 embedding_cache={"ttl_s": 3600, "model_ttl_s": {"e": 0.5}}) as gw:
        for model in ("e", "long"):
            assert embed(gw.url, "fleeting", model).headers["x-cache"] == "miss"
            assert embed(gw.url, "fleeting", model).headers["x-cache"] == "hit"
        time.sleep(0.7)
        assert embed(gw.url, "fleeting", "e").headers["x-cache"] == "miss"
        assert embed(gw.url, "fleeting", "long").headers["x-cache"] == "hit"
    assert len(upstream_inputs(replicas[0])) == 2 and len(upstream_inputs(replicas[1])) == 1


def test_hits_and_misses_are_counted_per_input_in_metrics(replicas, request):
    with gateway(replicas, request, "memory") as gw:
        embed(gw.url, TEXTS[:3])
        embed(gw.url, TEXTS[:5])
        embed(gw.url, TEXTS[:2])
        registry = gw.state.metrics.registry
        text = httpx.get(gw.url + "/metrics").text
    assert 'pagoda:gateway_embedding_cache_hits_total{model="e"} 5.0' in text
    assert 'pagoda:gateway_embedding_cache_misses_total{model="e"} 5.0' in text
    served = {"key": "alice", "model": "e", "upstream": "cache", "status": "200"}
    assert registry.get_sample_value("pagoda:gateway_requests_total", served) == 1
    upstream = replicas[0].url[7:]
    tokens = registry.get_sample_value("pagoda:gateway_tokens_total", {
        "key": "alice", "model": "e", "upstream": upstream, "kind": "prompt"})
    assert tokens == 5 * 5  # five distinct inputs of five words each were computed


def test_cache_control_opts_out(replicas, request):
    with gateway(replicas, request, "memory") as gw:
        embed(gw.url, ["a b", "c d"])
        # no-cache: every input is computed again (and stored again)
        r = embed(gw.url, ["a b", "c d"], headers={"Cache-Control": "no-cache"})
        assert r.headers["x-cache"] == "miss" and upstream_inputs(replicas[0])[2:] == ["a b", "c d"]
        assert embed(gw.url, "e f", headers={"cache-control": "No-Cache"}).headers["x-cache"] \
            == "miss"
        assert embed(gw.url, "e f").headers["x-cache"] == "hit"  # no-cache still wrote it
        # no-store: neither read nor written; the body goes upstream as the client sent it
        r = embed(gw.url, ["a b", "g h"], headers={"Cache-Control": "max-age=0, no-store"})
        assert r.headers["x-cache"] == "bypass"
        assert upstream_inputs(replicas[0])[5:] == ["a b", "g h"]
        assert replicas[0].stats()["embedding_formats"][-1] == "float"
        assert embed(gw.url, "g h").headers["x-cache"] == "miss"
        text = httpx.get(gw.url + "/metrics").text
    # opted-out requests are not lookups: only the four plain requests' inputs are counted
    assert 'pagoda:gateway_embedding_cache_hits_total{model="e"} 1.0' in text
    assert 'pagoda:gateway_embedding_cache_misses_total{model="e"} 3.0' in text


def test_cache_disabled_passes_requests_through(replicas, request):
    with gateway(replicas, request, "memory", embedding_cache={"enabled": False}) as gw:
        for _ in range(2):
            r = embed(gw.url, ["p q"], encoding_format="base64")
            assert r.headers["x-cache"] == "bypass"
            assert same(vectors(r), [fake_vector("p q")])
    assert replicas[0].stats()["embedding_formats"] == ["base64", "base64"]


def test_redis_down_still_answers_with_misses(replicas):
    proc, url = start_redis()
    try:
        with GatewayServer(make_config({"e": [replicas[0].url]}), url) as gw:
            assert embed(gw.url, TEXTS[:3]).headers["x-cache"] == "miss"
            assert embed(gw.url, TEXTS[:3]).headers["x-cache"] == "hit"
            proc.kill()
            proc.wait(timeout=10)
            for _ in range(2):  # lookups fail as misses, stores fail silently
                r = embed(gw.url, TEXTS[:3])
                assert r.status_code == 200 and r.headers["x-cache"] == "miss"
                assert same(vectors(r), [fake_vector(t) for t in TEXTS[:3]])
    finally:
        if proc.poll() is None:
            proc.kill()
    assert upstream_inputs(replicas[0]) == TEXTS[:3] * 3
