"""The bad-input corpus (bad_inputs.json: every field of every route, wrong types, out-of-range
values, malformed JSON, lone surrogates): each is refused with the expected 4xx in the route's
own error shape, and the same keep-alive connection serves a normal request right after."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

CORPUS = json.loads((Path(__file__).parent / "bad_inputs.json").read_text())
MODEL = "SmolLM2-135M-Instruct"
GOOD = {
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": MODEL, "max_tokens": 1,
                             "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages": {"model": MODEL, "max_tokens": 1,
                     "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 1},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        yield client


def error_message(route: str, body: dict) -> str:
    """The message, from the route's own error shape (Anthropic's on /v1/messages)."""
    if route == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"], body
        return body["error"]["message"]
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]["message"]


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{e['route']} {e['note']}" for e in CORPUS])
def test_refused_cleanly_then_the_connection_still_serves(http, entry):
    route = entry["route"]
    if "raw" in entry:
        r = http.post(route, content=entry["raw"].encode(),
                      headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=entry["body"])
    assert r.status_code == entry["expect"], (entry, r.text)
    assert error_message(route, r.json())
    ok = http.post(route, json=GOOD[route])
    assert ok.status_code == 200, ok.text


def test_the_corpus_covers_every_generation_route():
    assert {e["route"] for e in CORPUS} == set(GOOD)
    fields = {k for e in CORPUS if e["route"] == "/v1/completions" for k in e.get("body", {})}
    assert len(fields) >= 25
