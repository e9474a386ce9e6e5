"""End to end through a real gateway to fake upstream processes: auth, models, JSON and SSE
answers, usage pass-through, metrics, WebSocket pass-through, disconnects."""

from __future__ import annotations

import json
import logging
import time

import anthropic
import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.gateway.gateway_harness import (
    KEY_ALICE,
    KEY_BOB,
    GatewayServer,
    auth,
    make_config,
    wait_for,
)


def sse_payloads(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY_ALICE}"},
     {"Authorization": "Bearer"}],
)
def test_missing_or_invalid_key_gets_openai_401(replicas, headers):
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(gw.url + path, json={"model": "m", "prompt": "x"}, headers=headers)
            assert r.status_code == 401
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "invalid_api_key"
        assert httpx.get(gw.url + "/v1/models", headers=headers).status_code == 401
    assert replicas[0].stats()["requests"] == 0


def test_anthropic_clients_get_the_gateways_refusals_in_anthropics_shape(replicas):
    """On /v1/messages the gateway's own errors are Anthropic's shape (as a Pagoda server's
    are there), so Anthropic's SDK raises its typed errors with the gateway's message."""
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        ask = {"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        bad_key = anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as refused:
            bad_key.messages.create(model="m", **ask)
        assert refused.value.body["type"] == "error"
        assert refused.value.body["error"]["type"] == "authentication_error"
        client = anthropic.Anthropic(base_url=gw.url, api_key=KEY_ALICE, max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(model="no-such-model", **ask)
        assert missing.value.body["error"] == {
            "type": "not_found_error",
            "message": "The model `no-such-model` does not exist or you do not have access to it."}
    assert replicas[0].stats()["requests"] == 0


def test_key_never_logged(replicas, caplog):
    caplog.set_level(logging.DEBUG)
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x"}, headers=auth())
        httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x"},
                   headers=auth("sk-not-a-key"))
    assert caplog.records  # something was logged at DEBUG (httpx, uvicorn) ...
    assert KEY_ALICE not in caplog.text and "sk-not-a-key" not in caplog.text  # ... but no key


def test_models_listing_and_model_permissions(replicas):
    config = make_config({"m": [replicas[0].url], "other": [replicas[1].url]},
                         max_body_bytes=1 << 20)
    with GatewayServer(config) as gw:
        ids = [m["id"] for m in httpx.get(gw.url + "/v1/models", headers=auth()).json()["data"]]
        assert ids == ["m", "other"]
        ids = [m["id"] for m in
               httpx.get(gw.url + "/v1/models", headers=auth(KEY_BOB)).json()["data"]]
        assert ids == ["m"]  # bob may use only the first model
        r = httpx.post(gw.url + "/v1/completions", json={"model": "other", "prompt": "x"},
                       headers=auth(KEY_BOB))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(gw.url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                       headers=auth())
        assert r.status_code == 404
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x"}, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = httpx.post(gw.url + "/v1/completions", content=b"{not json", headers=auth())
        assert r.status_code == 400
        huge = {"model": "m", "prompt": "x" * (1 << 20)}
        r = httpx.post(gw.url + "/v1/completions", json=huge, headers=auth())
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert replicas[1].stats()["requests"] == 0


def test_json_and_sse_answers_pass_through(replicas):
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers=auth(), json={
            "model": "m", "messages": [{"role": "user", "content": "one two three"}],
            "max_tokens": 4})
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "[r1#1] w1 w2 w3"
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
        assert r.headers["x-pagoda-routed-to"] == "m" and r.headers["x-cache"] == "bypass"
        with httpx.stream("POST", gw.url + "/v1/completions", headers=auth(), json={
                "model": "m", "prompt": "a b", "max_tokens": 3, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            payloads = sse_payloads(list(r.iter_lines()))
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "[r1#2] w1 w2"
        assert all("usage" not in c for c in chunks)  # client did not ask for usage
        with httpx.stream("POST", gw.url + "/v1/completions", headers=auth(), json={
                "model": "m", "prompt": "a b", "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            payloads = sse_payloads(list(r.iter_lines()))
        assert json.loads(payloads[-2])["usage"]["total_tokens"] == 5
    # the gateway always asked upstream for usage, to count tokens
    assert replicas[0].stats()["requests"] == 3


def test_metrics_report_requests_tokens_and_health(replicas):
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        for _ in range(2):
            httpx.post(gw.url + "/v1/completions", headers=auth(),
                       json={"model": "m", "prompt": "a b c", "max_tokens": 5})
        text = httpx.get(gw.url + "/metrics").text
    up = replicas[0].url.split("://")[1]
    assert (f'pagoda:gateway_requests_total{{key="alice",model="m",status="200",'
            f'upstream="{up}"}} 2.0') in text
    assert f'pagoda:gateway_tokens_total{{key="alice",kind="completion",model="m",' \
           f'upstream="{up}"}} 10.0' in text
    assert f'pagoda:gateway_upstream_healthy{{model="m",upstream="{up}"}} 1.0' in text
    assert "pagoda:gateway_request_latency_seconds_bucket" in text


def test_websocket_passes_through(replicas):
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        ws_url = gw.url.replace("http", "ws") + "/v1/ws?model=m"
        with ws_connect(ws_url, additional_headers=auth()) as ws:
            for text in ("hello", "again"):
                ws.send(text)
                reply = json.loads(ws.recv(timeout=5))
                assert reply["echo"] == text and reply["upstream"] == "r1"
                assert reply["query"] == {"model": "m"}
        with ws_connect(ws_url + f"&api_key={KEY_ALICE}") as ws:  # browsers: key in the query
            ws.send("q")
            assert "api_key" not in json.loads(ws.recv(timeout=5))["query"]
        # each client that left closed its upstream session too
        wait_for(lambda: replicas[0].stats()["ws_closed"] == 2, timeout=5)
        with pytest.raises(InvalidStatus), ws_connect(ws_url) as ws:
            ws.send("x")
            ws.recv(timeout=5)


def test_client_disconnect_cancels_upstream_stream(replicas):
    replicas[0].control(chunk_delay_s=0.2)
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        with httpx.stream("POST", gw.url + "/v1/completions", headers=auth(), json={
                "model": "m", "prompt": "p", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.monotonic()
        # leaving the block closed the connection mid-stream
        wait_for(lambda: replicas[0].stats()["cancelled"] == 1, timeout=5)
        assert time.monotonic() - started < 3  # well before the 40 s the stream would take
        stats = replicas[0].stats()
        assert stats["active"] == 0 and stats["completed"] == 0
        wait_for(lambda: gw.state.pools["m"].upstreams[0].num_outstanding == 0, timeout=5)


def test_client_disconnect_cancels_a_non_streaming_request_upstream(replicas):
    replicas[0].control(delay_s=30)
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/completions", headers=auth(), timeout=1.0,
                       json={"model": "m", "prompt": "p", "max_tokens": 4})
        wait_for(lambda: replicas[0].stats()["cancelled"] == 1, timeout=5)
        assert replicas[0].stats()["completed"] == 0
        upstream = gw.state.pools["m"].upstreams[0]
        wait_for(lambda: upstream.num_outstanding == 0, timeout=5)
        wait_for(lambda: gw.state.metrics.registry.get_sample_value(
            "pagoda:gateway_requests_total",
            {"key": "alice", "model": "m", "upstream": "none", "status": "499"}) == 1, timeout=5)


def test_cors_for_web_pages_of_listed_origins(replicas):
    """A page of another origin may call the gateway (preflight, then the call) and read its
    answers, errors included; with `allowed_origins` set, other origins get no grant."""
    from pagoda.gateway.config import ConfigError

    origin = "http://127.0.0.1:5999"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"model": "m", "prompt": "p", "max_tokens": 2}
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:  # default: any origin
        granted = httpx.options(gw.url + "/v1/completions", headers=preflight)
        assert granted.status_code == 200
        assert granted.headers["access-control-allow-origin"] == "*"
        denied = httpx.post(gw.url + "/v1/completions", json=body, headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"
        ok = httpx.post(gw.url + "/v1/completions", json=body, headers={"Origin": origin, **auth()})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
        assert "x-request-id" in ok.headers["access-control-expose-headers"]
    only = make_config({"m": [replicas[0].url]}, allowed_origins=["https://app.example.com"])
    with GatewayServer(only) as gw:
        refused = httpx.options(gw.url + "/v1/completions", headers=preflight)
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        listed = httpx.options(gw.url + "/v1/completions",
                               headers={**preflight, "Origin": "https://app.example.com"})
        assert listed.headers["access-control-allow-origin"] == "https://app.example.com"
    with pytest.raises(ConfigError, match="allowed_origins"):
        make_config({"m": [replicas[0].url]}, allowed_origins="*")


@pytest.mark.parametrize("path, body, status", [
    # fields the gateway routes on, of the wrong type: passed on for the upstream to judge
    ("/v1/chat/completions", {"model": "m", "messages": 5}, None),
    ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}, {"type": "text"}]}]}, None),
    ("/v1/messages", {"model": "m", "max_tokens": 2, "messages": 7}, None),
    # fields the gateway acts on itself: its own 400s
    ("/v1/completions", {"model": "m", "prompt": "Hi", "stream": True,
                         "stream_options": "yes"}, 400),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "stream": "yes"}, 400),
])
def test_malformed_bodies_never_make_the_gateway_fail(replicas, path, body, status):
    """They were 500s in plain text (a TypeError while routing). None: reaches the upstream
    (this fake one answers whatever it makes of it; a Pagoda server answers a 400)."""
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        r = httpx.post(gw.url + path, json=body, headers=auth(KEY_ALICE))
        if status is None:
            assert r.headers.get("x-pagoda-upstream"), (r.status_code, r.text)
        else:
            assert r.status_code == status and "error" in r.json(), r.text
        deep = '{"model": "m", "prompt": "Hi", "x": ' + "[" * 1500 + "]" * 1500 + "}"
        r = httpx.post(gw.url + "/v1/completions", content=deep, headers=auth(KEY_ALICE))
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_routes_shape(replicas):
    """FastAPI's `{"detail": ...}` was the answer; a 405 says what is allowed."""
    with GatewayServer(make_config({"m": [replicas[0].url]})) as gw:
        r = httpx.get(gw.url + "/v1/chat/completions", headers=auth(KEY_ALICE))
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = httpx.post(gw.url + "/v1/nothing", headers=auth(KEY_ALICE), json={})
        assert r.status_code == 404 and "error" in r.json()
        r = httpx.get(gw.url + "/v1/messages", headers={"x-api-key": KEY_ALICE})
        assert r.status_code == 405 and r.json()["type"] == "error"  # Anthropic's shape
