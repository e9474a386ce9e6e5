"""One streamed OpenAI-compatible request, timed: the `RequestRecord` the benchmark is built from.

Timing rules (all times in seconds, from `time.perf_counter`):
  - TTFT is the time from sending the request to the first chunk that carries generated text;
  - ITL are the gaps between consecutive text-carrying chunks (a chunk of several tokens is one
    gap);
  - E2E is the time until the stream ends;
  - output tokens come from the server's final `usage` chunk when it sends one, else the number of
    text-carrying chunks (then `usage_reported` is False).
A request never raises: transport errors, HTTP errors and error payloads become `success=False`
records with the error text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from pagoda.bench.dataset import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send requests; `root_url` has no trailing /v1."""

    root_url: str
    model: str
    endpoint: str = "completions"
    ignore_eos: bool = False
    api_key: str | None = None
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; choose completions or chat")

    @property
    def url(self) -> str:
        return self.root_url.rstrip("/") + ENDPOINTS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    """The measured outcome of one request. Latencies are None when the request failed before
    producing the event they measure."""

    req_id: int
    prompt_len: int
    requested_output_len: int
    start_s: float = 0.0  # send time, relative to the benchmark start
    success: bool = False
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    server_prompt_tokens: int | None = None
    usage_reported: bool = False
    num_chunks: int = 0
    generated_text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.success or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**{k: v for k, v in data.items() if k != "tpot_s"})


def request_body(config: EndpointConfig, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        prompt = request.prompt
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        body["messages"] = messages
    else:
        if not isinstance(request.prompt, str):
            raise ValueError("the completions endpoint needs text prompts; use --endpoint chat")
        body["prompt"] = request.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text in one streamed chunk (completions `text` or chat `delta.content`)."""
    parts = []
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            parts.append(choice.get("text") or "")
        delta = choice.get("delta") or {}
        parts.append(delta.get("content") or "")
        parts.append(delta.get("reasoning_content") or "")
    return "".join(parts)


async def send_request(
    session: aiohttp.ClientSession,
    config: EndpointConfig,
    request: BenchRequest,
    req_id: int,
    bench_start: float,
) -> RequestRecord:
    """Stream one request and time it; see the module docstring for the rules. aiohttp rather
    than httpx: the client shares the machine with the server it measures, and httpx's stream
    took ~0.3 ms of CPU per chunk (32 concurrent streams on 2 cores, more than the server's
    own; docs/benchmarks.md, "Twenty-fourth session")."""
    record = RequestRecord(req_id, request.prompt_len, request.output_len)
    start = time.perf_counter()
    record.start_s = start - bench_start
    last_text_at = start
    texts: list[str] = []

    def on_line(raw: bytes) -> bool:
        """One SSE line; True once the stream is over ([DONE] or an error payload)."""
        nonlocal last_text_at
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            return False
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
            return True
        now = time.perf_counter()
        text = chunk_text(chunk)
        if text:
            if record.ttft_s is None:
                record.ttft_s = now - start
            else:
                record.itl_s.append(now - last_text_at)
            last_text_at = now
            record.num_chunks += 1
            texts.append(text)
        usage = chunk.get("usage")
        if usage:
            record.output_tokens = int(usage.get("completion_tokens", 0))
            record.server_prompt_tokens = usage.get("prompt_tokens")
            record.usage_reported = True
        return False

    try:
        body = request_body(config, request)
        async with session.post(config.url, json=body, headers=config.headers) as resp:
            if resp.status != 200:
                detail = (await resp.read()).decode(errors="replace")[:300]
                record.error = f"HTTP {resp.status}: {detail}"
                return record
            pending, done = b"", False
            # the body as it arrives, cut into lines here (aiohttp's own line reader refuses
            # lines longer than its buffer)
            async for piece in resp.content.iter_any():
                *lines, pending = (pending + piece).split(b"\n")
                for raw in lines:
                    done = on_line(raw)
                    if done:
                        break
                if done:
                    break
            if not done and pending:
                on_line(pending)
            if record.error:  # an error payload in the stream
                return record
        record.e2e_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - any failure of one request is data, not a crash
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        return record
    record.generated_text = "".join(texts)
    if not record.usage_reported:
        record.output_tokens = record.num_chunks
    if record.ttft_s is None:
        record.error = "stream ended without generated text"
        return record
    record.success = True
    return record
