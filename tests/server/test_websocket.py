"""`WS /v1/ws`: concurrent requests on one connection, cancel, errors, auth, disconnect."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http", "ws", 1) + "/v1/ws" + query


async def receive_until(ws, predicate, timeout: float = 120) -> list[dict]:
    messages = []
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            messages.append(message)
            if predicate(message):
                return messages


async def test_concurrent_requests_and_cancel(server):
    with server.client() as http:
        want = http.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 12, "temperature": 0}).json()
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "long", "messages": CHAT,
                                  "max_tokens": 2000, "ignore_eos": True}))
        await ws.send(json.dumps({"id": "short", "messages": CHAT, "max_tokens": 12,
                                  "temperature": 0}))
        messages = await receive_until(ws, lambda m: m["type"] == "done" and m["id"] == "short")
        short = [m for m in messages if m["id"] == "short"]
        assert short[0]["type"] == "start" and short[0]["prompt_tokens"] == \
            want["usage"]["prompt_tokens"]
        text = "".join(m["text"] for m in short if m["type"] == "delta")
        assert text == want["choices"][0]["message"]["content"]
        done = short[-1]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert done["usage"][key] == want["usage"][key]
        # the same prompt again: its full blocks come from the prefix cache
        cached = done["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert 0 < cached <= done["usage"]["prompt_tokens"]
        assert done["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
        assert done["timing"]["ttft_s"] > 0
        # the long request was streaming meanwhile; stop it
        assert any(m["id"] == "long" and m["type"] == "delta" for m in messages) or \
            await receive_until(ws, lambda m: m["id"] == "long" and m["type"] == "delta")
        assert server.kv()["num_running"] == 1
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        rest = await receive_until(ws, lambda m: m["type"] == "done" and m["id"] == "long")
        assert rest[-1]["cancelled"] is True
        kv = server.wait_all_blocks_free(timeout=5)
        assert kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_running"] == 0
        num_deltas = sum(m["type"] == "delta" for m in messages + rest if m["id"] == "long")
        assert num_deltas < 2000
        # the connection stays usable: completions too, and the id can be reused
        await ws.send(json.dumps({"type": "completion", "id": "long", "prompt": "Hello",
                                  "max_tokens": 3, "ignore_eos": True}))
        after = await receive_until(ws, lambda m: m["type"] == "done")
        assert after[-1]["usage"]["completion_tokens"] == 3


async def test_a_request_cancelled_at_once_still_gets_its_done(server):
    """A cancel right behind its request often arrives before the request's task has run at
    all: the client is still owed exactly one `done` (cancelled) for it, never silence."""
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        ids = [f"quick-{i}" for i in range(8)]
        for req_id in ids:
            await ws.send(json.dumps({"id": req_id, "messages": CHAT, "max_tokens": 300,
                                      "ignore_eos": True}))
            await ws.send(json.dumps({"type": "cancel", "id": req_id}))
        ended: dict[str, dict] = {}
        async with asyncio.timeout(120):
            while len(ended) < len(ids):
                message = json.loads(await ws.recv())
                if message["type"] in ("done", "error"):
                    assert message["id"] not in ended, message  # one ending per request
                    ended[message["id"]] = message
        assert all(ended[i]["type"] == "done" and ended[i]["cancelled"] is True for i in ids)
    kv = server.wait_all_blocks_free(timeout=10)
    assert kv["num_free_blocks"] == kv["num_total_blocks"]


async def test_bad_messages_get_errors(server):
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        cases = [
            ("not json", None),
            (json.dumps([1, 2]), None),
            (json.dumps({"messages": CHAT}), None),  # no id
            (json.dumps({"type": "dance", "id": "a"}), "a"),
            (json.dumps({"id": "b", "messages": []}), "b"),
            (json.dumps({"id": "c", "messages": CHAT, "temperature": -3}), "c"),
            (json.dumps({"id": "d", "messages": CHAT, "max_tokens": 10 ** 6}), "d"),
            (json.dumps({"id": "e", "messages": CHAT, "model": "nope"}), "e"),
            (json.dumps({"id": "f", "messages": "hi"}), "f"),
            # the done message carries the usage; per-message usage is not offered
            (json.dumps({"id": "g", "messages": CHAT,
                         "stream_options": {"continuous_usage_stats": True}}), "g"),
            # prompt log-probs have no message here: refused, not dropped
            (json.dumps({"id": "h", "messages": CHAT, "prompt_logprobs": 1}), "h"),
            (json.dumps({"type": "completion", "id": "i", "prompt": "x",
                         "prompt_logprobs": 0}), "i"),
        ]
        for text, req_id in cases:
            await ws.send(text)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert reply["type"] == "error" and reply["id"] == req_id, (text, reply)
            assert set(reply["error"]) == {"message", "type", "param", "code"}
        await ws.send(b"\xff\xfe")
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert reply["type"] == "error"
        await ws.send(json.dumps({"type": "cancel", "id": "never-started"}))  # ignored
        # replies always stream: stream_options is accepted without `stream`
        await ws.send(json.dumps({"id": "ok", "messages": CHAT, "max_tokens": 2,
                                  "stream_options": {"include_usage": True}}))
        done = await receive_until(ws, lambda m: m["type"] in ("done", "error"))
        assert done[-1]["type"] == "done" and done[-1]["id"] == "ok"


async def test_auth(server):
    with pytest.raises(InvalidStatus):
        async with connect(ws_url(server)):
            pass
    with pytest.raises(InvalidStatus):
        async with connect(ws_url(server, "?api_key=wrong")):
            pass
    async with connect(ws_url(server, f"?api_key={server.api_key}")) as ws:  # browsers
        await ws.send(json.dumps({"id": 1, "messages": CHAT, "max_tokens": 2}))
        done = await receive_until(ws, lambda m: m["type"] == "done")
        assert done[-1]["id"] == 1


async def test_closing_the_socket_aborts_requests(server):
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        for i in range(3):
            await ws.send(json.dumps({"id": i, "messages": CHAT, "max_tokens": 1500,
                                      "ignore_eos": True}))
        await receive_until(ws, lambda m: m["type"] == "delta")
        assert server.kv()["num_free_blocks"] < server.kv()["num_total_blocks"]
    kv = await asyncio.to_thread(server.wait_all_blocks_free, 5)
    assert kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_running"] == 0


async def test_completion_deltas_carry_the_logprobs_asked_for(server):
    """`logprobs: n` on a completion message: each delta's tokens with their log-probs and n
    alternatives, the same values the HTTP route returns."""
    with server.client() as http:
        want = http.post("/v1/completions", json={
            "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
            "logprobs": 2}).json()["choices"][0]["logprobs"]
    async with connect(ws_url(server), additional_headers=server.headers) as ws:
        await ws.send(json.dumps({"type": "completion", "id": "lp", "max_tokens": 4,
                                  "prompt": "The capital of France is", "temperature": 0,
                                  "logprobs": 2}))
        messages = await receive_until(ws, lambda m: m["type"] in ("done", "error"))
    entries = [e for m in messages if m["type"] == "delta" for e in m["logprobs"]]
    assert [e["token"] for e in entries] == want["tokens"]
    assert [e["logprob"] for e in entries] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
