"""Structured output through the real server with the official `openai` client: 20+ schemas
(streaming and not, n=2, temperature 0 and 1), regex and choice, completions, the WebSocket,
and 400s for constraints that cannot be compiled."""

from __future__ import annotations

import asyncio
import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from websockets.asyncio.client import connect

from tests.server.test_websocket import receive_until, ws_url
from tests.structured_output.schemas import SCHEMAS, chat_for

COMBOS = list(itertools.product([False, True], [0.0, 1.0], [1, 2]))  # stream, temperature, n


def chat_texts(oai, model, stream: bool, n: int, **kw) -> list[tuple[str, str]]:
    """[(content, finish_reason)] per choice, streamed or not."""
    if not stream:
        r = oai.chat.completions.create(model=model, n=n, **kw)
        return [(c.message.content, c.finish_reason) for c in r.choices]
    texts, finish = [""] * n, [None] * n
    for chunk in oai.chat.completions.create(model=model, n=n, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    return list(zip(texts, finish, strict=True))


def test_twenty_schemas_validate_streaming_or_not_n2_temperature_0_and_1(oai, model, server):
    def one(i: int):
        desc, schema = SCHEMAS[i]
        stream, temperature, n = COMBOS[i % len(COMBOS)]
        fmt = {"type": "json_schema", "json_schema": {
            "name": f"s{i}", "schema": schema, "strict": i % 2 == 0}}
        return i, chat_texts(oai, model, stream, n, messages=chat_for(desc), max_tokens=200,
                             temperature=temperature, seed=i, response_format=fmt)

    assert len(SCHEMAS) >= 20
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one continuous batch
        results = list(pool.map(one, range(len(SCHEMAS))))
    for i, choices in results:
        for text, finish in choices:
            assert finish == "stop", (SCHEMAS[i][0], text)
            jsonschema.validate(json.loads(text), SCHEMAS[i][1])
    server.wait_all_blocks_free()


def test_json_object_regex_and_choice_on_chat_and_completions(oai, model):
    ask = [{"role": "user", "content": "Reply in JSON: what is the capital of France?"}]
    [(text, _)] = chat_texts(oai, model, False, 1, messages=ask, max_tokens=100, temperature=0,
                             response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)
    for stream in (False, True):
        [(text, _)] = chat_texts(oai, model, stream, 1, messages=chat_for("a phone number"),
                                 max_tokens=20, temperature=1.0,
                                 extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
        assert len(text) == 8 and text[3] == "-"
    r = oai.completions.create(model=model, prompt="My favourite colour is", max_tokens=10,
                               temperature=1.0, n=2, extra_body={"guided_choice": ["red", "blue"]})
    assert {c.text for c in r.choices} <= {"red", "blue"}
    text = "".join(c.choices[0].text for c in oai.completions.create(
        model=model, prompt="A user record:", max_tokens=120, temperature=0, stream=True,
        extra_body={"guided_json": SCHEMAS[0][1]}))
    jsonschema.validate(json.loads(text), SCHEMAS[0][1])
    r = oai.completions.create(model=model, prompt="Answer:", max_tokens=10, temperature=0,
                               extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("fields, param, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "not": {"const": 1}}}}}, "response_format",
     "'not'"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    ({"structured_outputs": {"grammar": "start: WORD"}}, "structured_outputs", "Lark"),
    ({"logit_bias": {"999999": 5}}, "logit_bias", "vocabulary"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "reasoning"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
])
def test_unusable_constraints_and_fields_are_a_400(server, fields, param, reason):
    with server.client() as http:
        for path, body in (("/v1/chat/completions", {"messages": chat_for("x")}),
                           ("/v1/completions", {"prompt": "x"})):
            r = http.post(path, json={**body, "max_tokens": 5, **fields})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and reason in error["message"]


def test_logit_bias_over_http(oai, model):
    r = oai.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0,
                               logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == oai.completions.create(
        model=model, prompt="Hello", max_tokens=4, temperature=0, logit_bias={"42": 100},
        extra_body={"ignore_eos": True, "allowed_token_ids": [42]}).choices[0].text


async def test_structured_output_over_the_websocket(server):
    schema = SCHEMAS[1][1]
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "j", "messages": chat_for(SCHEMAS[1][0]),
                                  "max_tokens": 120, "temperature": 0,
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "c", "schema": schema}}}))
        await ws.send(json.dumps({"type": "chat", "id": "bad", "messages": chat_for("x"),
                                  "guided_regex": "[a-"}))
        messages = await receive_until(ws, lambda m: m["type"] == "done" and m["id"] == "j")
    text = "".join(m["text"] for m in messages if m["type"] == "delta" and m["id"] == "j")
    jsonschema.validate(json.loads(text), schema)
    [error] = [m for m in messages if m["type"] == "error"]
    assert error["id"] == "bad" and error["error"]["param"] == "guided_regex"


def test_many_cached_compiles_do_not_slow_or_leak(server):
    async def burst():
        import httpx

        async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                     timeout=120) as http:
            bodies = [{"messages": chat_for("a weekday"), "max_tokens": 8, "temperature": 0,
                       "response_format": {"type": "json_schema", "json_schema": {
                           "name": "d", "schema": SCHEMAS[12][1]}}} for _ in range(12)]
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=b)
                                          for b in bodies))

    replies = asyncio.run(burst())
    texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert len(texts) == 1 and json.loads(texts.pop()) in SCHEMAS[12][1]["enum"]
    server.wait_all_blocks_free()
