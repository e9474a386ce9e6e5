"""A small fake OpenAI-compatible server for the benchmark tests, run by real uvicorn on loopback.

Tokenizer: words of more than 5 letters are two tokens ("▁" + first 3 letters, then the rest),
shorter words one, so cutting a token list can split a word and re-encoding can change the count,
as with a real BPE tokenizer. Generation streams `max_tokens` tokens ("tok0 tok1 ..."),
`tokens_per_chunk` per SSE chunk, and reports `usage` in a final chunk when asked.

Metrics: with `spec_metrics_prefix` set ("pagoda:" or "vllm:"), GET /metrics serves Prometheus
text whose speculative-decoding counters start at SPEC_START and advance by SPEC_PER_REQUEST for
every fully streamed request (before its `[DONE]`, so a client that has read `[DONE]` sees the
advance). A second model's counters stay fixed, so summing over models must not change a run's
difference. Without a prefix there is no /metrics route (404), as with llama-server.
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
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class FakeBehavior:
    tokenize_style: str | None = "pagoda"  # "pagoda", "llama" or None (no /tokenize)
    token_delay_s: float = 0.002
    tokens_per_chunk: int = 1
    send_usage: bool = True
    fail_every: int = 0  # every n-th generation request answers HTTP 500 (0: never)
    stream_error_every: int = 0  # every n-th generation request breaks off with an error chunk
    model: str = "fake-model"
    spec_metrics_prefix: str | None = None  # "pagoda:", "vllm:" or None (no /metrics)
    # filled in while serving
    num_generation_requests: int = 0
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    num_streams_done: int = 0


@dataclass(frozen=True)
class SpecCounts:
    num_drafts: int
    num_draft_tokens: int
    accepted_per_pos: tuple[int, ...]


# Three draft tokens per draft; acceptance falls with the position, as in real drafters.
SPEC_START = SpecCounts(num_drafts=50, num_draft_tokens=150, accepted_per_pos=(40, 25, 10))
SPEC_PER_REQUEST = SpecCounts(num_drafts=4, num_draft_tokens=12, accepted_per_pos=(4, 3, 1))
SPEC_OTHER_MODEL = SpecCounts(num_drafts=7, num_draft_tokens=21, accepted_per_pos=(5, 2, 1))


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


def metrics_text(behavior: FakeBehavior) -> str:
    n = behavior.num_streams_done
    ours = SpecCounts(
        num_drafts=SPEC_START.num_drafts + n * SPEC_PER_REQUEST.num_drafts,
        num_draft_tokens=SPEC_START.num_draft_tokens + n * SPEC_PER_REQUEST.num_draft_tokens,
        accepted_per_pos=tuple(
            a + n * b
            for a, b in zip(
                SPEC_START.accepted_per_pos, SPEC_PER_REQUEST.accepted_per_pos, strict=True
            )
        ),
    )
    p = behavior.spec_metrics_prefix
    models = [(behavior.model, ours), ("other-model", SPEC_OTHER_MODEL)]
    lines = [
        f"# TYPE {p}generation_tokens_total counter",
        f'{p}generation_tokens_total{{model_name="{behavior.model}"}} 123.0',
    ]
    totals = {
        "num_drafts": lambda c: c.num_drafts,
        "num_draft_tokens": lambda c: c.num_draft_tokens,
        "num_accepted_tokens": lambda c: sum(c.accepted_per_pos),
    }
    for name, value_of in totals.items():
        lines.append(f"# TYPE {p}spec_decode_{name}_total counter")
        for model, counts in models:
            value = value_of(counts)
            lines.append(f'{p}spec_decode_{name}_total{{model_name="{model}"}} {value}.0')
    lines.append(f"# TYPE {p}spec_decode_num_accepted_tokens_per_pos_total counter")
    for model, counts in models:
        for pos, value in enumerate(counts.accepted_per_pos):
            lines.append(
                f"{p}spec_decode_num_accepted_tokens_per_pos_total"
                f'{{model_name="{model}",position="{pos}"}} {value}.0'
            )
    return "\n".join(lines) + "\n"


def build_app(behavior: FakeBehavior) -> FastAPI:
    app = FastAPI()

    if behavior.spec_metrics_prefix is not None:

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(metrics_text(behavior))

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
        behavior.num_streams_done += 1
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
