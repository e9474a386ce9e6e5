"""A fake OpenAI-compatible upstream for gateway tests and benchmarks.

Run as `python tests/gateway/fake_upstream.py --port P --name r1`. It answers `/v1/completions` and
`/v1/chat/completions` (JSON or SSE) with deterministic text naming itself and a per-replica serial
number, reports `usage`, serves `/health` and an echoing `/v1/ws`, answers `/v1/embeddings` with
deterministic vectors (see `fake_vector`), and can be steered by tests:

- `POST /control` with any of `healthy`, `fail_next`, `fail_mode`, `delay_s`, `chunk_delay_s`,
  `linger_s` (seconds a stream stays open after `[DONE]`);
  `fail_mode` is "500", "400", "502" or "503" (that HTTP status; a 503 with
  Retry-After: 7), "early" (200 headers, then the connection
  drops before any body byte) or "midstream" (drops after two chunks).
- `GET /stats` reports counters: requests, completed, cancelled (requests whose client vanished),
  active, and the prompts and models seen; for embeddings, the requests, the inputs in the order
  received, and the encoding formats asked for.
- `POST /reset` restores defaults and zeroes counters.

Usage: prompt_tokens = words in the rendered prompt; completion_tokens = max_tokens (default 8).
Embeddings: prompt_tokens = words of each text input, or its number of token ids. Like `pagoda
serve`, the embeddings route refuses unknown fields and `dimensions` with a 400 naming them, and
an input containing "TOO LONG" with a 400 naming `input[k]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse

EMBEDDING_DIM = 8
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user",
                    "truncate_prompt_tokens"}


@dataclass
class Behaviour:
    healthy: bool = True
    fail_next: int = 0
    fail_mode: str = "500"
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    linger_s: float = 0.0  # keep a stream open this long after [DONE]


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    active: int = 0
    ws_closed: int = 0  # WebSocket sessions that ended because the other side went away
    prompts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    embedding_requests: int = 0
    embedding_inputs: list = field(default_factory=list)  # every input, as received, in order
    embedding_formats: list[str] = field(default_factory=list)


class UpstreamDropped(Exception):
    """Raised inside a response to make the server drop the connection."""


def render(body: dict) -> str:
    if "messages" in body:
        return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in body["messages"])
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))


def fake_vector(item: str | list[int], truncate: int | None = None) -> np.ndarray:
    """A deterministic float32 vector of one input: the same on every replica, so tests can
    compare answers across replicas, gateways and cache states."""
    digest = hashlib.sha256(json.dumps([item, truncate]).encode()).digest()
    words = np.frombuffer(digest, dtype="<u4")[:EMBEDDING_DIM].astype(np.float64)
    return ((words / 2**31) - 1.0).astype("<f4")


def embedding_inputs(value) -> list:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [value]
    return list(value)


def create_fake_app(name: str) -> FastAPI:
    app = FastAPI()
    behaviour = Behaviour()
    stats = Stats()
    app.state.behaviour, app.state.stats = behaviour, stats

    @app.get("/health")
    async def health():
        status = 200 if behaviour.healthy else 503
        return JSONResponse({"ok": behaviour.healthy}, status_code=status)

    @app.get("/stats")
    async def get_stats():
        return asdict(stats)

    @app.post("/control")
    async def control(request: Request):
        for k, v in (await request.json()).items():
            setattr(behaviour, k, v)
        return asdict(behaviour)

    @app.post("/reset")
    async def reset():
        nonlocal behaviour, stats
        for k, v in asdict(Behaviour()).items():
            setattr(behaviour, k, v)
        for k, v in asdict(Stats()).items():
            setattr(stats, k, v)
        return {"ok": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": name}]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        stats.requests += 1
        serial = stats.requests
        prompt = render(body)
        stats.prompts.append(prompt)
        stats.models.append(body.get("model"))
        failing = behaviour.fail_next > 0
        if failing:
            behaviour.fail_next -= 1
            if behaviour.fail_mode in ("500", "400", "502", "503"):
                status = int(behaviour.fail_mode)
                headers = {"Retry-After": "7"} if status == 503 else None
                return JSONResponse({"error": {"message": f"injected by {name}"}},
                                    status_code=status, headers=headers)
        if behaviour.delay_s and not body.get("stream"):
            # like a real server: stop working on a request whose client has gone
            deadline = time.monotonic() + behaviour.delay_s
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    stats.cancelled += 1
                    return JSONResponse({}, status_code=499)
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        elif behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        n = body.get("max_tokens") or 8
        pieces = [f"[{name}#{serial}]"] + [f" w{i}" for i in range(1, n)]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                 "total_tokens": len(prompt.split()) + n}
        head = {"id": f"cmpl-{name}-{serial}", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                          "finish_reason": "length"}
            else:
                choice = {"index": 0, "text": "".join(pieces), "logprobs": None,
                          "finish_reason": "length"}
            stats.completed += 1
            obj = "chat.completion" if chat else "text_completion"
            return {**head, "object": obj, "choices": [choice], "usage": usage}
        mode = behaviour.fail_mode if failing else ""
        return StreamingResponse(stream(head, pieces, usage, chat, body, mode),
                                 media_type="text/event-stream")

    async def stream(head, pieces, usage, chat, body, mode):
        obj = "chat.completion.chunk" if chat else "text_completion"
        stats.active += 1
        finished = False
        try:
            if mode == "early":
                raise UpstreamDropped("before first byte")
            for i, piece in enumerate(pieces):
                if mode == "midstream" and i == 2:
                    raise UpstreamDropped("mid-stream")
                last = i == len(pieces) - 1
                if chat:
                    choice = {"index": 0, "delta": {"content": piece},
                              "finish_reason": "length" if last else None}
                else:
                    choice = {"index": 0, "text": piece, "logprobs": None,
                              "finish_reason": "length" if last else None}
                yield f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"
                if behaviour.chunk_delay_s:
                    await asyncio.sleep(behaviour.chunk_delay_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                final = {**head, "object": obj, "choices": [], "usage": usage}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
            stats.completed += 1
            if behaviour.linger_s:
                await asyncio.sleep(behaviour.linger_s)
        finally:
            stats.active -= 1
            if not finished and not mode:
                stats.cancelled += 1

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        stats.embedding_requests += 1
        stats.models.append(body.get("model"))
        if behaviour.fail_next > 0 and behaviour.fail_mode in ("500", "400", "502", "503"):
            behaviour.fail_next -= 1
            status = int(behaviour.fail_mode)
            headers = {"Retry-After": "7"} if status == 503 else None
            return JSONResponse({"error": {"message": f"injected by {name}"}},
                                status_code=status, headers=headers)
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        unknown = sorted(set(body) - EMBEDDING_FIELDS)
        refused = unknown[0] if unknown else ("dimensions" if "dimensions" in body else None)
        if refused is not None:
            return error(f"Unsupported parameter: {refused}", refused)
        inputs = embedding_inputs(body["input"])
        for k, item in enumerate(inputs):
            if isinstance(item, str) and "TOO LONG" in item:
                return error(f"input[{k}] is longer than the model's 512 tokens", f"input[{k}]")
        stats.embedding_inputs.extend(inputs)
        encoding = body.get("encoding_format") or "float"
        stats.embedding_formats.append(encoding)
        data = []
        for i, item in enumerate(inputs):
            vector = fake_vector(item, body.get("truncate_prompt_tokens"))
            embedding = (base64.b64encode(vector.tobytes()).decode() if encoding == "base64"
                         else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in inputs)
        return {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def error(message: str, param: str) -> JSONResponse:
        body = {"message": message, "type": "invalid_request_error", "param": param,
                "code": None}
        return JSONResponse({"error": body}, status_code=400)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.websocket("/v1/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        query = dict(websocket.query_params)
        try:
            while True:
                text = await websocket.receive_text()
                reply = {"echo": text, "upstream": name, "query": query,
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
                await websocket.send_text(json.dumps(reply))
        except WebSocketDisconnect:
            stats.ws_closed += 1

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    args = parser.parse_args()
    uvicorn.run(create_fake_app(args.name), host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
