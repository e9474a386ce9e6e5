"""API-key check for the API routes (health, metrics and the chat page stay open): a Bearer
token, or Anthropic's `x-api-key` header."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda.server.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/debug/")


def token_matches(authorization: str | None, api_key: str) -> bool:
    """True when an `Authorization` header carries `Bearer <api_key>` (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class APIKeyMiddleware:
    """Refuses protected HTTP requests without the key (401, OpenAI's error shape).

    WebSockets authenticate in their own handler, which also accepts an `api_key` query
    parameter because browsers cannot set headers on a WebSocket.
    """

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1")
            x_api_key = headers.get(b"x-api-key", b"").decode("latin-1")  # Anthropic's clients
            if not (token_matches(header, self.api_key)
                    or token_matches(f"Bearer {x_api_key}", self.api_key)):
                error = APIError(401, "missing or incorrect API key; send 'Authorization: "
                                 "Bearer <key>' or 'x-api-key: <key>'", code="invalid_api_key")
                await error.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
