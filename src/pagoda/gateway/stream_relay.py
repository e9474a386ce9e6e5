"""Relaying an upstream SSE stream to the client, event by event, without buffering.

Each upstream event is forwarded as soon as its terminating blank line arrives. Events are parsed
only when needed: to find `usage` (for token limits), to assemble a cacheable answer, or to rewrite
`model` to the public name. The gateway always asks the upstream for a usage chunk; if the client
did not, that chunk is dropped before it reaches the client.

A client disconnect cancels the relay; `ProxiedStream` then closes the upstream response, which
drops the upstream connection — that is how the upstream learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagoda.gateway.errors import error_body
from pagoda.gateway.proxy import OpenStream
from pagoda.gateway.sse import SSESplitter, StreamAssembler, encode_event, event_data
from pagoda.gateway.upstream_client import UPSTREAM_ERRORS


@dataclass(slots=True)
class RelayOutcome:
    """What the relay saw; read by the cleanup after the stream ends, however it ended."""

    usage: dict[str, Any] | None = None
    usage_recorded: bool = False
    input_usage: dict[str, Any] | None = None  # Anthropic's message_start: input tokens
    saw_done: bool = False
    done_notified: bool = False
    upstream_failed: bool = False
    assembled: dict[str, Any] | None = field(default=None)


OnUsage = Callable[[dict[str, Any]], Awaitable[None]]
OnComplete = Callable[[dict[str, Any]], Awaitable[None]]


async def relay_events(
    stream: OpenStream,
    outcome: RelayOutcome,
    *,
    wants_usage: bool,
    public_model: str | None,
    assembler: StreamAssembler | None,
    on_usage: OnUsage,
    on_complete: OnComplete,
    on_done: Callable[[], Awaitable[None]],
    ends_with_done: bool = True,
) -> AsyncIterator[bytes]:
    """Yield the client's bytes. `public_model`, if set, replaces every chunk's `model`.

    `ends_with_done`: the stream ends with OpenAI's `[DONE]`; other streams are done when the
    upstream ends them. `on_usage` (token accounting), `on_complete` (the assembled answer, for
    the cache) and
    `on_done` (the upstream sent `[DONE]`: release the concurrency slot) run *before* the bytes
    that carried them are forwarded, so once a client has read `[DONE]`, its tokens are counted,
    its answer is cached and its slot is free: its next request sees all three.
    """
    splitter = SSESplitter()
    try:
        async for data in stream.chunks():
            # everything complete in this read goes out in one write; nothing waits for more
            out = b"".join(
                _pass(event, outcome, wants_usage, public_model, assembler)
                for event in splitter.feed(data)
            )
            if outcome.usage is not None and not outcome.usage_recorded:
                outcome.usage_recorded = True
                await on_usage(outcome.usage)
            if outcome.saw_done and assembler is not None and outcome.assembled is None:
                if assembler.complete:
                    outcome.assembled = assembler.body()
                    await on_complete(outcome.assembled)
            if outcome.saw_done and not outcome.done_notified:
                outcome.done_notified = True
                await on_done()
            if out:
                yield out
        if splitter.rest().strip():
            yield splitter.rest() + b"\n\n"
        if not ends_with_done and not outcome.done_notified:
            # event streams without [DONE] (Responses, Anthropic) are done when they end
            outcome.saw_done = outcome.done_notified = True
            await on_done()
    except UPSTREAM_ERRORS as exc:
        # Bytes already reached the client, so no retry: end the stream with an error event.
        outcome.upstream_failed = True
        message = f"upstream {stream.upstream.name} failed mid-stream: {type(exc).__name__}"
        yield encode_event(error_body(message, "upstream_error", "upstream_failed"))


def _pass(
    event: bytes,
    outcome: RelayOutcome,
    wants_usage: bool,
    public_model: str | None,
    assembler: StreamAssembler | None,
) -> bytes:
    """The bytes to forward for one upstream event (empty to drop it), noting what it carries."""
    payload = event_data(event)
    if payload is None:
        return event
    if payload.strip() == b"[DONE]":
        outcome.saw_done = True
        return event
    if assembler is None and public_model is None and b'"usage"' not in payload:
        return event  # the common case: forwarded unparsed
    try:
        chunk = json.loads(payload)
    except ValueError:
        return event
    if not isinstance(chunk, dict):
        return event
    usage = _usage(chunk, outcome)
    if usage:
        outcome.usage = usage
    if assembler is not None:
        assembler.add(chunk)
    if not chunk.get("choices") and chunk.get("usage") and not wants_usage:
        return b""  # the usage chunk the gateway asked for on its own behalf
    if public_model is not None:
        # OpenAI's chunks name the model at the top; Responses' events in `response`,
        # Anthropic's message_start in `message`
        named = [d for d in (chunk, chunk.get("response"), chunk.get("message"))
                 if isinstance(d, dict) and "model" in d]
        for d in named:
            d["model"] = public_model
        if named:
            return encode_event(chunk, like=event)
    return event


def _usage(chunk: dict[str, Any], outcome: RelayOutcome) -> dict[str, Any] | None:
    """The usage an event reports, in any of the three stream shapes: OpenAI's usage chunk,
    Responses' terminal event (`response.usage`), Anthropic's message_start (input tokens,
    kept) and message_delta (output tokens: the two together)."""
    kind = chunk.get("type")
    if kind in ("response.completed", "response.incomplete", "response.failed"):
        response = chunk.get("response")
        return response.get("usage") if isinstance(response, dict) else None
    if kind == "message_start":
        message = chunk.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        outcome.input_usage = usage if isinstance(usage, dict) else None
        return None
    usage = chunk.get("usage")
    if kind == "message_delta" and isinstance(usage, dict):
        return {**(outcome.input_usage or {}), **usage}
    return usage if isinstance(usage, dict) else None


class ProxiedStream(StreamingResponse):
    """A StreamingResponse that always runs `cleanup` once it is done with the client, whether the
    stream finished, failed, or the client went away before the first byte was sent."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        cleanup: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, headers=headers, media_type="text/event-stream")
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            iterator = self.body_iterator
            if hasattr(iterator, "aclose"):
                await iterator.aclose()
            # shielded: cleanup releases limits and connections even if this task is cancelled
            await asyncio.shield(self._cleanup())
