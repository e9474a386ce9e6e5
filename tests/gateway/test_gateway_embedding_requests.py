"""`/v1/embeddings` through the gateway: bad inputs refused before any upstream call, keys, model
routing and renaming, retries, the upstream's own errors passed through (with the client's
indexes), unknown fields left to the upstream."""

from __future__ import annotations

import httpx
import pytest

from pagoda.gateway.embedding_request import MAX_INPUTS
from tests.gateway.gateway_harness import KEY_BOB, GatewayServer, auth, make_config

BAD_BODIES = [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["a", ""]}, "input[1]"),
    ({"input": ["a", 3]}, "input[1]"),
    ({"input": [[1, 2], "a"]}, "input[1]"),
    ({"input": [[1], []]}, "input[1]"),
    ({"input": [[1], [2, "3"]]}, "input[1]"),
    ({"input": [1, -2]}, "input"),
    ({"input": [1, 2.5]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": None}, "input"),
    ({"input": 7}, "input"),
    ({"input": [None]}, "input[0]"),
    ({"input": [True, False]}, "input[0]"),
    ({"input": ["x"] * 10_000}, "input"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": "8"}, "dimensions"),
    ({"input": "a", "truncate_prompt_tokens": 1.5}, "truncate_prompt_tokens"),
    ({"input": "a", "truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
    ({"input": "a", "user": 5}, "user"),
    ({}, "input"),
]


def embed(url: str, body: dict, key_headers=None, headers=None) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json=body,
                      headers={**(key_headers or auth()), **(headers or {})}, timeout=30)


@pytest.fixture
def gw(replicas):
    with GatewayServer(make_config({"e": [replicas[0].url]})) as server:
        yield server


def test_bad_inputs_are_400s_naming_the_field_before_any_upstream_call(replicas, gw,
                                                                       monkeypatch):
    for body, param in BAD_BODIES:
        r = embed(gw.url, {"model": "e", **body})
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", body
        assert param.split("[")[0] in error["message"]
    lone_surrogate = b'{"model": "e", "input": ["ok", "\\ud800"]}'
    r = httpx.post(gw.url + "/v1/embeddings", content=lone_surrogate,
                   headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
    assert replicas[0].stats()["embedding_requests"] == 0
    r = embed(gw.url, {"model": "e", "input": [f"t{i}" for i in range(MAX_INPUTS)]})
    assert r.status_code == 200 and len(r.json()["data"]) == MAX_INPUTS  # the limit itself
    assert [d["index"] for d in r.json()["data"]] == list(range(MAX_INPUTS))
    assert replicas[0].stats()["embedding_requests"] == 1


def test_keys_and_models_are_checked(replicas):
    config = make_config({"e": [replicas[0].url], "other": [replicas[1].url]})
    with GatewayServer(config) as gw:
        r = httpx.post(gw.url + "/v1/embeddings", json={"model": "e", "input": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = embed(gw.url, {"model": "other", "input": "a"}, key_headers=auth(KEY_BOB))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert embed(gw.url, {"model": "nope", "input": "a"}).status_code == 404
        assert embed(gw.url, {"model": "e", "input": "a"}, auth(KEY_BOB)).status_code == 200


def test_routing_renaming_and_retries(replicas):
    pool = {"name": "e", "policy": "round_robin", "upstream_model": "fake-embedder",
            "upstreams": [replicas[0].url, replicas[1].url]}
    virtual = [{"name": "embed-auto", "default": "e"}]
    config = make_config({"e": []}, models=[pool], virtual_models=virtual,
                         retry={"max_attempts": 2})
    with GatewayServer(config) as gw:
        replicas[0].control(fail_next=1, fail_mode="503")
        replicas[1].control(fail_next=1, fail_mode="503")
        r = embed(gw.url, {"model": "e", "input": ["one", "two"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "7"  # the last 503, passed
        r = embed(gw.url, {"model": "embed-auto", "input": ["one", "two"]})
        assert r.status_code == 200 and r.json()["model"] == "e"
        assert r.headers["x-pagoda-routed-to"] == "e" and r.headers["x-cache"] == "miss"
        replicas[0].control(fail_next=1, fail_mode="503")
        replicas[1].control(fail_next=1, fail_mode="503")
        r = embed(gw.url, {"model": "e", "input": ["three", "one"]})
        assert r.status_code == 503  # both failed; nothing stored
        r = embed(gw.url, {"model": "e", "input": ["three", "one"]})
        assert r.status_code == 200 and r.headers["x-cache"] == "partial"
        for replica in replicas[:2]:
            replica.control(fail_next=1, fail_mode="500")
        r = embed(gw.url, {"model": "e", "input": "four"})
        assert r.status_code == 500  # a replica's own 500 is its word: not retried
        asked = sum(u.stats()["embedding_requests"] for u in replicas[:2])
        for replica in replicas[:2]:
            replica.control(fail_next=0)
        with_bypass = embed(gw.url, {"model": "e", "input": "five"},
                            headers={"Cache-Control": "no-store"})
        assert with_bypass.json()["model"] == "e"  # renamed back on the pass-through path too
    seen = replicas[0].stats()["models"] + replicas[1].stats()["models"]
    assert set(seen) == {"fake-embedder"}
    assert asked == 2 + 1 + 2 + 1 + 1  # the 500 was asked of one replica only


def test_upstream_errors_name_the_clients_indexes(replicas, gw):
    assert embed(gw.url, {"model": "e", "input": ["a", "b"]}).status_code == 200
    r = embed(gw.url, {"model": "e", "input": ["a", "b", "c is TOO LONG"]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input[2]" and error["message"].startswith("input[2] ")
    assert replicas[0].stats()["embedding_requests"] == 2  # sent: ["c is TOO LONG"] alone
    r = embed(gw.url, {"model": "e", "input": ["x TOO LONG", "y"]})
    assert r.json()["error"]["param"] == "input[0]"


def test_unknown_fields_go_upstream_whole(replicas, gw):
    r = embed(gw.url, {"model": "e", "input": "a", "normalize": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "normalize"
    assert r.headers["x-cache"] == "bypass"
    assert replicas[0].stats()["embedding_requests"] == 1
