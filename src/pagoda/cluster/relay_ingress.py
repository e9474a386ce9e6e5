"""The "prefix" router's ingress deployment: every HTTP request in, relayed to an engine replica
through a handle whose router reads the prompt (relay.py explains the path).

It holds no model and reserves no CPU of its own: reading a body, hashing 256 characters and
passing ASGI messages on costs little next to a generation.
"""

# No `from __future__ import annotations` here: Ray's class-based ingress re-creates the route
# functions elsewhere, where FastAPI could not resolve string annotations (Request would be
# read as a query parameter).
import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, WebSocket
from ray import serve
from starlette.responses import Response

from pagoda.cluster.relay import RelayedRequest, affinity_of
from pagoda.server.errors import overloaded
from pagoda.server.websocket import POLICY_VIOLATION

if TYPE_CHECKING:
    from pagoda.cluster.ray_serve import RayServeConfig

log = logging.getLogger(__name__)

INGRESS = "pagoda-ingress"
RETRY_AFTER_S = 1
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


class RelayedResponse(Response):
    """An ASGI response made of the replica's own messages; a client that disconnects
    mid-stream closes the handle's stream, and so the replica's request."""

    def __init__(self, start: dict[str, Any], rest: Any) -> None:
        super().__init__()  # FastAPI passes a Response through; the body is `rest`
        self.start, self.rest = start, rest

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def pump() -> None:
            await send(self.start)
            async for message in self.rest:
                await send(message)

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(client_gone())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done:
                tasks[0].result()
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
            self.rest.cancel()  # the replica's generator ends (a no-op once it has)


app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


# At module level: Ray pickles the class by reference.
@serve.ingress(app)
class PagodaIngress:
    def __init__(self, engines: Any, prefix_chars: int) -> None:
        self.engines = engines.options(stream=True)
        self.prefix_chars = prefix_chars

    @app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def http(self, request: Request) -> Response:
        body = await request.body()
        scope = request.scope
        headers = list(scope["headers"])
        relayed = RelayedRequest(
            request.method, scope["path"], scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""), headers, body, scope.get("client"),
            affinity_of(request.method, headers, body, self.prefix_chars))
        stream = self.engines.relay.remote(relayed)
        try:
            start = await stream.__anext__()  # the replica's status line and headers
        except Exception as exc:  # noqa: BLE001 - no replica answered: the route's error shape
            stream.cancel()
            log.warning("relay to an engine replica failed: %s", exc)
            return overloaded(RETRY_AFTER_S, f"no engine replica answered: "
                                             f"{type(exc).__name__}").response(scope["path"])
        return RelayedResponse(start, stream)

    @app.websocket("/{path:path}")
    async def websocket(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.close(POLICY_VIOLATION, "WebSocket is not relayed by --ray-router prefix; "
                                         "use SSE streaming or --ray-router pow2")


def ingress_deployment(ray_config: "RayServeConfig") -> Any:
    """The ingress deployment (bind it to the engine deployment and the prefix size)."""
    return serve.deployment(PagodaIngress, name=INGRESS, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=ray_config.max_ongoing_requests * 4)
