"""A small fake OpenAI-compatible server for the benchmark tests, run by real uvicorn on loopback.

Tokenizer: words of more than 5 letters are two tokens ("▁" + first 3 letters, then the rest),
shorter words one, so cutting a token list can split a word and re-encoding can change the count,
as with a real BPE tokenizer. Generation streams `max_tokens` tokens ("tok0 tok1 ..."),
`tokens_per_chunk` per SSE chunk, and reports `usage` in a final chunk when asked.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class FakeBehavior:
    tokenize_style: str | None = "pagoda"  # "pagoda", "llama" or None (no /tokenize)
    token_delay_s: float = 0.002
    tokens_per_chunk: int = 1
    send_usage: bool = True
    fail_every: int = 0  # every n-th generation request answers HTTP 500 (0: never)
    stream_error_every: int = 0  # every n-th generation request breaks off with an error chunk
    model: str = "fake-model"
    # filled in while serving
    num_generation_requests: int = 0
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0


VOCAB: dict[str, int] = {}
PIECES: list[str] = []


def piece_id(piece: str) -> int:
    if piece not in VOCAB:
        VOCAB[piece] = len(PIECES)
        PIECES.append(piece)
    return VOCAB[piece]


def encode(text: str) -> list[int]:
    ids = []
    for word in text.split():
        if len(word) > 5:
            ids += [piece_id("▁" + word[:3]), piece_id(word[3:])]
        else:
            ids.append(piece_id("▁" + word))
    return ids


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids).replace("▁", " ").strip()


def build_app(behavior: FakeBehavior) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": behavior.model, "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        key = {"pagoda": "prompt", "llama": "content"}.get(behavior.tokenize_style or "")
        if key is None or key not in body:
            return JSONResponse({"error": "not supported"}, status_code=404)
        ids = encode(body[key])
        reply = {"tokens": ids, "count": len(ids)} if key == "prompt" else {"tokens": ids}
        return JSONResponse(reply)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        if behavior.tokenize_style is None:
            return JSONResponse({"error": "not supported"}, status_code=404)
        text = decode((await request.json())["tokens"])
        key = "prompt" if behavior.tokenize_style == "pagoda" else "content"
        return JSONResponse({key: text})

    async def generate(request: Request, chat: bool):
        body = await request.json()
        behavior.num_generation_requests += 1
        behavior.bodies.append(body)
        n = behavior.num_generation_requests
        if behavior.fail_every and n % behavior.fail_every == 0:
            return JSONResponse({"error": {"message": "deliberate failure"}}, status_code=500)
        if chat:
            prompt_tokens = len(encode(" ".join(m["content"] for m in body["messages"])))
        else:
            prompt_tokens = len(encode(body["prompt"]))
        max_tokens = int(body["max_tokens"])
        breaks = bool(behavior.stream_error_every and n % behavior.stream_error_every == 0)
        return StreamingResponse(
            stream(behavior, chat, prompt_tokens, max_tokens, breaks, body),
            media_type="text/event-stream",
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


async def stream(behavior, chat, prompt_tokens, max_tokens, breaks, body):
    behavior.in_flight += 1
    behavior.peak_in_flight = max(behavior.peak_in_flight, behavior.in_flight)
    try:
        if chat:
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        sent = 0
        while sent < max_tokens:
            await asyncio.sleep(behavior.token_delay_s)
            count = min(behavior.tokens_per_chunk, max_tokens - sent)
            text = "".join(f" tok{sent + i}" for i in range(count))
            sent += count
            if breaks and sent > max_tokens // 2:
                yield sse({"error": {"message": "deliberate stream error"}})
                return
            choice = {"index": 0, "text": text}
            if chat:
                choice = {"index": 0, "delta": {"content": text}}
            yield sse({"choices": [choice]})
        wants_usage = (body.get("stream_options") or {}).get("include_usage")
        if behavior.send_usage and wants_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": max_tokens,
                "total_tokens": prompt_tokens + max_tokens,
            }
            yield sse({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        behavior.in_flight -= 1


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class FakeServer:
    """Context manager: serves `behavior` on a free loopback port; `.url` is its root URL."""

    def __init__(self, behavior: FakeBehavior | None = None) -> None:
        self.behavior = behavior or FakeBehavior()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            build_app(self.behavior), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
