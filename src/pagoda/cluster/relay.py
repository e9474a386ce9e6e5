"""HTTP relayed through a Ray Serve handle, so that a router can see the request body.

Ray's HTTP proxy hands a deployment only the request's ASGI scope; the body follows later, once
a replica has been chosen. Prefix-aware routing needs the prompt *before* that choice, so
`--ray-router prefix` puts a light ingress deployment in front of the engine replicas:

    client -> Ray proxy -> ingress: reads the body, computes the prompt's affinity text
                        -> handle.relay(RelayedRequest)   (the router reads `affinity` here)
                        -> engine replica: runs its own OpenAI app on the request in-process and
                           streams back the ASGI messages (start, then body chunks), which the
                           ingress sends on unchanged.

Invariants: the replica's app sees the request exactly as `pagoda serve` would (method, path,
query, headers with the API key, body), and its response goes back byte for byte, SSE included.
A client that leaves closes the handle's stream; the replica's generator then tells the app
`http.disconnect`, which aborts the engine request as it does for `pagoda serve`.
WebSocket (`/v1/ws`, the chat page's transport) is not relayed: in this mode it is refused with
a close reason naming the default router, which serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagoda.gateway.router import affinity_text

MAX_AFFINITY_BODY = 8 << 20  # larger bodies are relayed without a prefix key (parsing costs)


@dataclass(frozen=True)
class RelayedRequest:
    """One HTTP request as the ingress received it; `affinity` is what the router hashes."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    affinity: str | None  # the prompt's leading text, None when there is no prompt

    def scope(self) -> dict[str, Any]:
        # spec 2.3: Starlette's StreamingResponse then watches `receive` for the disconnect
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1", "method": self.method, "scheme": "http",
                "path": self.path, "raw_path": self.raw_path, "root_path": "",
                "query_string": self.query_string, "headers": self.headers,
                "client": self.client, "server": None}


def affinity_of(method: str, headers: list[tuple[bytes, bytes]], body: bytes,
                num_chars: int) -> str | None:
    """The first `num_chars` of the text a replica's prefix cache would hold for this request
    (the gateway's prefix policy's text), or None for requests without a JSON prompt."""
    if method != "POST" or not body or len(body) > MAX_AFFINITY_BODY:
        return None
    content_type = dict(headers).get(b"content-type", b"")
    if not content_type.startswith(b"application/json"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None  # the replica answers the malformed body with its own 400
    if not isinstance(payload, dict):
        return None
    text = affinity_text(payload)
    return text[:num_chars] if text else None


async def run_relayed(app: Any, request: RelayedRequest) -> AsyncIterator[dict[str, Any]]:
    """Run the ASGI `app` on `request` in this process; yield its `http.response.*` messages.
    Closing this generator early (the client left) is a disconnect for the app."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    body = [request.body]

    async def receive() -> dict[str, Any]:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.put_nowait(message)

    task = asyncio.create_task(app(request.scope(), receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the app returned; what it sent is already queued
                getter.cancel()
                if messages.empty():
                    task.result()  # its exception, if it raised
                    return
                continue
            message = getter.result()
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=30)
