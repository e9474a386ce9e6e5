"""The gateway's FastAPI app: OpenAI-compatible routes in front of upstream pools.

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (JSON or SSE), `/v1/responses`,
`/v1/messages`, `/v1/embeddings` (with the per-input embedding cache), `/v1/ws` (WebSocket
pass-through), `/health` (the gateway's own, with its view of each upstream) and
`/metrics` (Prometheus text, unauthenticated like any scrape target).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda.gateway.auth import bearer_token
from pagoda.gateway.completions import serve_completion
from pagoda.gateway.config import GatewayConfig
from pagoda.gateway.embeddings import serve_embeddings
from pagoda.gateway.errors import error_response, in_route_shape, unauthorized
from pagoda.gateway.openapi import install_openapi
from pagoda.gateway.state import GatewayState
from pagoda.gateway.websocket import serve_websocket
from pagoda.server.last_resort import LastResortMiddleware


def create_app(config: GatewayConfig, redis_url: str | None = None,
               otlp_traces_endpoint: str | None = None) -> FastAPI:
    """A gateway app; `redis_url` / `otlp_traces_endpoint` (if given) override the config's."""
    state = GatewayState.build(config, redis_url)
    endpoint = otlp_traces_endpoint or config.otlp_traces_endpoint
    provider = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.close()
            if provider is not None:
                provider.shutdown()  # flushes the spans still batched

    app = FastAPI(title="Pagoda gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = state
    install_openapi(app, state.public_models())
    if endpoint:
        from pagoda import telemetry

        provider = telemetry.tracer_provider("pagoda-gateway", endpoint)
        telemetry.instrument(app, provider)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        key = await state.keys.authenticate_async(token)
        if key is None:
            return unauthorized("Missing or invalid API key. Send `Authorization: Bearer <key>`.")
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "pagoda"}
            for name in state.public_models()
            if key.allows(name)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve_completion(state, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve_completion(state, request, "/v1/chat/completions")

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await serve_completion(state, request, "/v1/responses")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await serve_completion(state, request, "/v1/messages")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await serve_embeddings(state, request)

    @app.websocket("/v1/ws")
    async def websocket(ws: WebSocket) -> None:
        await serve_websocket(state, ws)

    @app.get("/health")
    async def health() -> JSONResponse:
        upstreams = {}
        for pool in state.pools.values():
            now = pool.clock()
            upstreams[pool.name] = {u.name: u.available(now) for u in pool.upstreams}
        # a readiness probe: with no upstream of any model in rotation every request would be
        # a 502, so the gateway says it cannot serve (one model down leaves the others served)
        serving = any(any(pool.values()) for pool in upstreams.values())
        return JSONResponse({"status": "ok" if serving else "unavailable",
                             "upstreams": upstreams}, status_code=200 if serving else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        state.health.publish()
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        """404s and 405s (with Allow) in the route's error shape, not FastAPI's `detail`."""
        response = error_response(exc.status_code, str(exc.detail), "invalid_request_error",
                                  None, headers=exc.headers)
        return in_route_shape(response, request.url.path)

    # an unforeseen exception is a 500 in the route's error shape (OpenAI's, Anthropic's on
    # /v1/messages), logged once, and the keep-alive connection stays usable
    app.add_middleware(LastResortMiddleware)
    if config.allowed_origins:
        # added last, so outermost: preflights carry no key, and every answer (a 401 or 429
        # too) is readable by the page, with the headers a client reads
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["retry-after", "x-pagoda-upstream", "x-request-id",
                                           "x-ratelimit-remaining-requests",
                                           "x-ratelimit-remaining-tokens"])
    return app
