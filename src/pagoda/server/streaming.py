"""HTTP plumbing for engine-backed responses: SSE framing and abort-on-disconnect.

Streaming: Starlette (ASGI spec 2.3 under uvicorn) watches for `http.disconnect` while a
`StreamingResponse` runs and cancels the body iterator, which closes the engine generator and so
aborts the request. Non-streaming requests get the same guarantee from `cancel_on_disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagoda.server.engine_client import Ticket
from pagoda.server.errors import APIError

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


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
    if task.cancelled():
        raise APIError(499, "the client closed the connection")
    return task.result()
