"""Values a hostile or careless client sends that once crashed the engine, answered 500, dropped
a WebSocket or emitted garbage (found by a probe of the live server): each is now a clean answer
and the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from tests.server.test_websocket import receive_until, ws_url

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def greedy(http, **extra):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 6,
                                                "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("top_k", [2**63, 10**20])
def test_a_top_k_beyond_int64_samples_and_the_engine_lives(http, top_k):
    """It once overflowed a tensor inside the sampler and killed the engine for every client."""
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4,
                                                "top_k": top_k, "seed": 1})
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200
    assert greedy(http)


def test_a_temperature_below_1e_5_is_greedy(http):
    assert greedy(http, temperature=1e-38) == greedy(http)


@pytest.mark.parametrize("where", ["response_format", "tools", "guided_json"])
def test_a_schema_nested_too_deeply_is_a_400(http, where):
    schema = nested_schema(120)  # 4 KB; 240 levels of JSON once exhausted the validator's stack
    body: dict = {"messages": CHAT, "max_tokens": 4}
    if where == "response_format":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": schema}}
    elif where == "tools":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    else:
        body["guided_json"] = schema
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert "levels deep" in r.json()["error"]["message"]


def test_a_schema_of_ordinary_depth_still_compiles(http):
    body = {"messages": CHAT, "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": nested_schema(20)}}}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("field, value", [("guided_regex", r"[^\s\S]"),
                                          ("guided_grammar", "root ::= root")])
def test_a_constraint_no_output_can_match_is_a_400(http, field, value):
    """An all-masked row was sampled as token 0 with null log-probs."""
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, field: value})
    assert r.status_code == 400, r.text
    assert "admits no output" in r.json()["error"]["message"]


def test_allowed_token_ids_of_stop_tokens_only_under_min_tokens_is_a_400(http, server):
    eos = http.post("/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False})
    [eos_id] = eos.json()["tokens"]
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "min_tokens": 2,
                                           "allowed_token_ids": [eos_id]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text


def test_a_deeply_nested_websocket_message_is_an_error_and_the_socket_serves_on(server):
    async def go():
        async with connect(ws_url(server), additional_headers=server.headers) as ws:
            await ws.send(json.dumps({"id": "a", "messages": CHAT, "max_tokens": 8}))
            await ws.send('{"id": "z", "a": ' + "[" * 1500 + "]" * 1500 + "}")
            got = await receive_until(ws, lambda m: m.get("type") == "done" and m["id"] == "a")
            errors = [m for m in got if m.get("type") == "error"]
            assert errors and "not valid JSON" in errors[0]["error"]["message"]
    asyncio.run(go())


def test_a_websocket_validation_error_names_the_field_as_http_does(server, http):
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["\\udc00"]}'
    over_http = http.post("/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}).json()["error"]

    async def go():
        async with connect(ws_url(server), additional_headers=server.headers) as ws:
            await ws.send(body.replace("{", '{"id": "s", ', 1))
            return await receive_until(ws, lambda m: m.get("type") == "error")
    [error] = asyncio.run(go())
    assert error["error"]["param"] == over_http["param"] == "stop.0"  # no union-branch tag


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain",
                                          None])
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):
    """`curl -d '{...}'` sends form-urlencoded: read as JSON, as llama-server reads it."""
    import httpx

    headers = {**server.headers, **({"content-type": content_type} if content_type else {})}
    body = json.dumps({"messages": CHAT, "max_tokens": 2}).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 200, r.text
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"messages=hi",
                     headers=headers)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


def test_websocket_ids_1_and_quoted_1_are_two_requests(server):
    async def go():
        async with connect(ws_url(server), additional_headers=server.headers) as ws:
            for req_id in (1, "1"):
                await ws.send(json.dumps({"id": req_id, "messages": CHAT, "max_tokens": 4}))
            done: list = []
            got = await receive_until(ws, lambda m: m.get("type") in ("done", "error") and (
                done.append(m["id"]) or len(done) == 2))
            return got, done
    got, done = asyncio.run(go())
    assert sorted(map(repr, done)) == sorted(map(repr, [1, "1"]))
    assert not [m for m in got if m["type"] == "error"]


def test_a_lone_surrogate_is_named_where_the_client_wrote_it(http):
    body = ('{"max_tokens": 2, "messages": [{"role": "system", "content": "Be brief."}, '
            '{"role": "user", "content": [{"type": "text", "text": "hi \\ud800"}]}]}')
    r = http.post("/v1/chat/completions", content=body,
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.content", r.text
    assert "character 3" in r.json()["error"]["message"]  # in the client's text, not the prompt
