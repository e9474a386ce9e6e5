"""Regressions found by hostile clients (issue 15): lone surrogates, keys in logs, loose types,
unbounded stop strings, out-of-vocabulary stop ids, the OpenAPI schema, 405 without Allow, and
an unhandled exception that used to drop the keep-alive connection."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient
from websockets.asyncio.client import connect

from pagoda.server.last_resort import LastResortMiddleware
from tests.server.server_process import API_KEY
from tests.server.test_websocket import receive_until, ws_url

SURROGATE = b'"a\\ud800b"'  # JSON text: a lone high surrogate, valid JSON, invalid Unicode
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:  # one keep-alive connection for the whole module
        yield client


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"prompt": %s, "max_tokens": 2}' % SURROGATE),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}' % SURROGATE),
    ("/tokenize", b'{"prompt": %s}' % SURROGATE),
    ("/tokenize", b'{"messages": [{"role": "user", "content": %s}]}' % SURROGATE),
])
def test_lone_surrogate_is_a_400_and_the_connection_survives(http, path, body):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]
    ok = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200  # same connection: not reset


async def test_lone_surrogate_over_the_websocket(server):
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        await ws.send('{"type": "completion", "id": "s", "prompt": "a\\ud800", "max_tokens": 2}')
        await ws.send(json.dumps({"type": "completion", "id": "ok", "prompt": "Hi",
                                  "max_tokens": 2}))
        messages = await receive_until(ws, lambda m: m["type"] == "done" and m["id"] == "ok")
    [error] = [m for m in messages if m["type"] == "error"]
    assert error["id"] == "s" and error["error"]["param"] == "prompt"


@pytest.mark.parametrize("field, value", [
    ("stream", "yes"), ("stream", 1), ("max_tokens", True), ("n", True), ("echo", "false"),
    ("temperature", "0.5"), ("ignore_eos", "true"), ("seed", 1.5),
])
def test_strict_types_for_booleans_and_numbers(http, field, value):
    r = http.post("/v1/completions", json={"prompt": "x", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), r.text


def test_stop_strings_and_stop_ids_are_bounded(http):
    r = http.post("/v1/completions", json={"prompt": "x", "stop": "a" * 100_000})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop")
    r = http.post("/v1/completions", json={"prompt": "x", "stop": ["ab"] * 17})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop")
    r = http.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [10 ** 7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stop": "a" * 1000})
    assert ok.status_code == 200


def test_openapi_has_no_422_and_shows_the_bounds(http):
    schema = http.get("/openapi.json").json()
    assert "422" not in json.dumps({p: {m: op.get("responses") for m, op in ops.items()}
                                    for p, ops in schema["paths"].items()})
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["temperature"]["maximum"] == 100 and fields["top_p"]["maximum"] == 1
    assert fields["n"]["minimum"] == 1 and fields["presence_penalty"]["minimum"] == -2


def test_method_not_allowed_says_what_is_allowed(http):
    r = http.request("TRACE", "/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert set(r.json()) == {"error"}


def test_an_unhandled_exception_is_a_500_and_never_reaches_the_server():
    async def boom(request):
        raise RuntimeError("bug")

    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(LastResortMiddleware)
    with TestClient(app, raise_server_exceptions=True) as client:  # raises if it escaped
        r = client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"


def test_api_keys_never_reach_the_log(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post(f"/v1/completions?api_key={API_KEY}", json={"prompt": "x"})
        assert r.status_code == 401  # keys go in headers; the query is not a credential

    async def chat_page_style():
        async with connect(ws_url(server, f"?api_key={API_KEY}")) as ws:
            await ws.send(json.dumps({"type": "completion", "id": 1, "prompt": "Hi",
                                      "max_tokens": 1}))
            await receive_until(ws, lambda m: m["type"] == "done")

    asyncio.run(chat_page_style())
    log = server.log_tail(2_000_000)
    assert "WebSocket /v1/ws?api_key=[redacted]" in log  # the line is there, redacted
    assert API_KEY not in log


def test_the_redaction_filter_covers_uvicorns_loggers():
    import uvicorn

    from pagoda import log_redaction

    uvicorn.Config(app=lambda *a: None, log_level="info")  # applies uvicorn's logging config
    log_redaction.install()
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning('%s - "GET %s HTTP/1.1" %d', "1.2.3.4",
                           "/v1/ws?model=m&api_key=pk-secret&token=t0k", 200)
        finally:
            logger.removeHandler(handler)
    text = sink.getvalue()
    assert "pk-secret" not in text and "t0k" not in text and "model=m" in text
    assert text.count("[redacted]") == 4


def test_liveness_and_readiness_probes(http):
    for path in ("/health/live", "/health/ready"):
        r = http.get(path)
        assert r.status_code == 200 and r.json()["status"] == "ok"
