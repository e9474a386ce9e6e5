"""The last line of defence: no exception ever reaches uvicorn.

Starlette's `ServerErrorMiddleware` answers an unhandled exception with the app's 500 handler and
then re-raises it; uvicorn logs it and drops the keep-alive connection, so a client's *next*
request on that connection fails with "connection reset". This middleware sits inside it: it
logs the exception once, sends a 500 in the route's shape if the response has not started (if
it has, the stream is already committed and only ends), and returns normally.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.server.errors import APIError

log = logging.getLogger(__name__)


class LastResortMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the point of this middleware
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:
                response = APIError(500, f"internal error: {type(exc).__name__}").response(
                    scope.get("path"))
                await response(scope, receive, send)
