"""Request bodies before any parsing: the size limit (413 in the route's error shape), and JSON
whatever the Content-Type says.

The body is read here — refusing as soon as it passes the limit, whether or not a Content-Length
was sent — and replayed to the app, so no handler ever sees an oversized body. Every POST route
takes JSON, so a body sent as `curl -d` sends it (application/x-www-form-urlencoded) or as
text/plain is read as JSON, as llama-server and Ollama read it: FastAPI would hand the route
bytes and answer "Input should be a valid dictionary", which names nothing the client did.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.server.errors import APIError


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as usual

        await self.app(as_json(scope), replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"request body exceeds {self.max_bytes} bytes",
                         code="request_too_large")
        response = error.response(scope.get("path"))  # Anthropic's shape on its routes
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def as_json(scope: Scope) -> Scope:
    """`scope` with its Content-Type set to JSON (any other type, or none)."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    declared = dict(scope.get("headers") or []).get(b"content-type", b"")
    kind = declared.split(b";")[0].strip().lower()
    if kind == b"application/json" or kind.endswith(b"+json"):
        return scope
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
