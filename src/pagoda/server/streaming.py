"""HTTP plumbing for engine-backed responses: SSE framing and abort-on-disconnect.

Streaming: Starlette (ASGI spec 2.3 under uvicorn) watches for `http.disconnect` while a
`StreamingResponse` runs and cancels the body iterator, which closes the engine generator and so
aborts the request. Non-streaming requests get the same guarantee from `cancel_on_disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.server.engine_client import Ticket, error_of
from pagoda.server.errors import APIError
from pagoda.server.protocol import StreamOptions, UsageInfo

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class StreamUsage:
    """What a stream reports of its usage (`stream_options`)."""

    final: bool = False  # include_usage: a last chunk with the request's usage
    continuous: bool = False  # continuous_usage_stats (vLLM): the usage so far on every chunk

    @classmethod
    def of(cls, options: StreamOptions | None) -> StreamUsage:
        if options is None:
            return cls()
        return cls(options.include_usage, options.continuous_usage_stats)


async def sse_body(outputs: AsyncIterator[RequestOutput], template: BaseModel,
                   choice_of: Callable[[CompletionOutput], BaseModel | None],
                   num_prompt_tokens: int, usage: StreamUsage,
                   opening: BaseModel | None = None) -> AsyncIterator[str]:
    """The SSE body of `/v1/completions` and `/v1/chat/completions`.

    `opening` (chat's role chunk) first; then, per engine output, one copy of `template` holding
    each sample's choice (`choice_of` returns None for a delta with nothing to show yet, e.g. half
    of a UTF-8 character), with the usage so far when the client asked for it on every chunk;
    an error event and [DONE] if the engine fails; the usage chunk when the client asked for
    it; [DONE]. Closing this iterator closes `outputs`, which aborts the
    request in the engine."""
    generated: dict[int, int] = {}  # sample index -> tokens generated so far
    cached = 0

    def usage_now() -> UsageInfo:
        return UsageInfo.of(num_prompt_tokens, sum(generated.values()), cached)

    def so_far() -> dict[str, UsageInfo]:
        return {"usage": usage_now()} if usage.continuous else {}

    async with contextlib.aclosing(outputs):
        if opening is not None:
            yield sse_event(opening.model_copy(update=so_far()))
        async for out in outputs:
            if out.error:
                yield sse_event(error_of(out.error).body())
                yield SSE_DONE
                return
            choices = []
            for delta in out.outputs:
                generated[delta.index] = delta.num_generated_tokens
                choice = choice_of(delta)
                if choice is not None:
                    choices.append(choice)
            if out.metrics is not None:
                cached = out.metrics.num_cached_tokens
            if choices:
                yield sse_event(template.model_copy(update={"choices": choices, **so_far()}))
    if usage.final:
        yield sse_event(template.model_copy(update={"usage": usage_now()}))
    yield SSE_DONE


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that releases its admission ticket however the stream ends — even when
    the client vanished before the body iterator was ever started."""

    def __init__(self, body: AsyncIterator[str], ticket: Ticket):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.ticket = ticket
        self.source = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()
            aclose = getattr(self.source, "aclose", None)
            if aclose is not None:
                await aclose()  # a never-started or cancelled generator still runs its cleanup


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # a cancelled gather() is not cancelled() itself: it holds a CancelledError as its exception
    if task.cancelled() or isinstance(task.exception(), asyncio.CancelledError):
        raise APIError(499, "the client closed the connection")
    return task.result()
