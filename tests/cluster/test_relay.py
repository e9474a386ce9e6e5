"""The "prefix" router's parts without a Ray cluster: the affinity text the ingress computes,
the in-process relay of a request through an ASGI app (JSON, streaming, a client that leaves),
rendezvous ranking (a replica that leaves moves only the prefixes it owned) and the load bound."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from pagoda.cluster.prefix_router import bounded_choice
from pagoda.cluster.relay import RelayedRequest, affinity_of, run_relayed
from pagoda.gateway.router import rendezvous_score

JSON = [(b"content-type", b"application/json")]


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_affinity_is_the_cached_part_of_the_prompt():
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}]}
    # the newest message differs per request: the prefix is what came before it
    assert affinity_of("POST", JSON, body(chat), 256) == "system: Be brief.\n"
    assert affinity_of("POST", JSON, body({"prompt": "x" * 500}), 256) == "x" * 256
    assert affinity_of("POST", JSON, body({"prompt": [1, 2, 3]}), 256) is not None


@pytest.mark.parametrize("method,headers,raw", [
    ("GET", JSON, b""),  # /v1/models, /health
    ("POST", JSON, b"{not json"),  # the replica answers it with its own 400
    ("POST", [(b"content-type", b"text/plain")], body({"prompt": "hi"})),
    ("POST", JSON, body(["a list"])),
    ("POST", JSON, body({"model": "m"})),  # no prompt at all
])
def test_requests_without_a_prompt_have_no_affinity(method, headers, raw):
    assert affinity_of(method, headers, raw, 256) is None


def relayed(path: str, payload: bytes = b"") -> RelayedRequest:
    return RelayedRequest("POST" if payload else "GET", path, path.encode(), b"a=1", JSON,
                          payload, ("127.0.0.1", 5), None)


@pytest.fixture()
def app_and_log():
    app = FastAPI()
    log: list[str] = []

    @app.post("/echo")
    async def echo(payload: dict, a: int) -> JSONResponse:
        return JSONResponse({"got": payload, "a": a}, status_code=201, headers={"x-one": "1"})

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
                log.append("finished")
            except asyncio.CancelledError:
                log.append("cancelled")  # what aborts an engine request in the real app
                raise

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app, log


async def test_a_json_request_comes_back_as_the_app_sent_it(app_and_log):
    app, _ = app_and_log
    messages = [m async for m in run_relayed(app, relayed("/echo", body({"k": "v"})))]
    start, *rest = messages
    assert start["type"] == "http.response.start" and start["status"] == 201
    assert (b"x-one", b"1") in start["headers"]
    assert json.loads(b"".join(m.get("body", b"") for m in rest)) == {"got": {"k": "v"}, "a": 1}


async def test_a_client_that_leaves_mid_stream_cancels_the_app(app_and_log):
    app, log = app_and_log
    stream = run_relayed(app, relayed("/stream"))
    start = await stream.__anext__()
    assert start["status"] == 200
    first = await stream.__anext__()
    assert first["body"] == b"data: 0\n\n" and first["more_body"]
    await stream.aclose()  # Ray closes the replica's generator when the client goes
    assert log == ["cancelled"]


def test_a_replica_that_leaves_moves_only_its_own_prefixes():
    replicas = ["r1", "r2", "r3"]
    texts = [f"system prompt {i}" for i in range(300)]

    def owner(text: str, among: list[str]) -> str:
        return max(among, key=lambda r: rendezvous_score(text, r))

    before = {t: owner(t, replicas) for t in texts}
    after = {t: owner(t, ["r1", "r3"]) for t in texts}
    assert all(after[t] == before[t] for t in texts if before[t] != "r2")
    assert {before[t] for t in texts} == set(replicas)  # every replica owns some prefixes


def test_load_is_bounded_to_its_share():
    ranked = ["a", "b", "c"]  # this prefix's ranking
    assert bounded_choice(ranked, {}, 1.25) == 0
    assert bounded_choice(ranked, {"a": 1, "b": 1, "c": 1}, 1.25) == 0  # 4/3 x 1.25 -> cap 2
    assert bounded_choice(ranked, {"a": 2, "b": 0, "c": 0}, 1.25) == 1  # a over its share
    assert bounded_choice(ranked, {"a": 3, "b": 3, "c": 0}, 1.25) == 2  # 7/3 x 1.25 -> cap 3
    assert bounded_choice(["a", "b"], {"a": 1, "b": 0}, 1.25) == 0  # two at a time stay put
    # however the hash falls, no replica takes more than 1.25 x the mean plus one
    loads = {"a": 0, "b": 0, "c": 0}
    for _ in range(30):
        loads[ranked[bounded_choice(ranked, loads, 1.25)]] += 1
    assert max(loads.values()) <= 1.25 * 30 / 3 + 1
