"""The FastAPI application: routes, middleware and the engine's lifecycle.

Routes only translate (schemas in `protocol.py`/`chat_protocol.py`, engine calls through
`EngineClient`). The model loads in the background after the socket is up: `/health` answers 503
until the engine runs, so orchestrators can probe a starting server, and again if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

import pagoda
from pagoda.server.auth import APIKeyMiddleware
from pagoda.server.body_limit import BodyLimitMiddleware
from pagoda.server.chat import create_chat_completion
from pagoda.server.chat_protocol import ChatCompletionRequest, ChatCompletionResponse
from pagoda.server.completions import create_completion
from pagoda.server.config import ServerConfig
from pagoda.server.embeddings import create_embedding
from pagoda.server.embeddings_protocol import EmbeddingRequest, EmbeddingResponse
from pagoda.server.engine_client import EngineClient
from pagoda.server.errors import APIError, install_error_handlers, openapi_without_422
from pagoda.server.last_resort import LastResortMiddleware
from pagoda.server.messages import count_tokens, create_message
from pagoda.server.messages_protocol import (
    CountTokensRequest,
    MessagesRequest,
    MessagesResponse,
    TokenCount,
)
from pagoda.server.protocol import (
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    KVCacheInfo,
    ModelCard,
    ModelList,
)
from pagoda.server.responses import create_response
from pagoda.server.responses_protocol import ResponsesRequest
from pagoda.server.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
)
from pagoda.server.websocket import serve_websocket

log = logging.getLogger(__name__)

STATIC_DIR = resources.files("pagoda.server") / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)}
STREAM = {200: {"content": {"text/event-stream": {}},
                "description": "JSON body, or SSE chunks when `stream` is true"}}


def build_app(config: ServerConfig, on_fatal: Callable[[], None] | None = None,
              client: EngineClient | None = None) -> FastAPI:
    """`client` may be given already loaded (tests); otherwise the lifespan loads the model."""
    client = client or EngineClient(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = None

        def loaded(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None and on_fatal is not None:
                on_fatal()  # the model cannot load: the process should exit, not linger

        if client.llm is None:
            task = asyncio.create_task(client.load())
            task.add_done_callback(loaded)
        yield
        if client.status != "failed":  # a failed load keeps its status: the exit code says it
            client.status = "draining"
        if task is not None and not task.done():
            task.cancel()
        client.shutdown()
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched

    app = FastAPI(title="Pagoda", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM server (completions, chat, embeddings, "
                              "tokenize, WebSocket streaming).")
    app.state.client = client
    provider = None
    if config.otlp_traces_endpoint:
        from pagoda import telemetry

        provider = telemetry.tracer_provider("pagoda-server", config.otlp_traces_endpoint)
        telemetry.instrument(app, provider)
        client.tracer = provider.get_tracer("pagoda.server")
    install_error_handlers(app)
    openapi_without_422(app)
    app.add_middleware(LastResortMiddleware)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.allowed_origins:
        # added last, so outermost: it answers preflights before the API key is asked for
        # (a browser sends none with them) and marks every answer, errors included
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=list(config.allowed_methods),
                           allow_headers=list(config.allowed_headers),
                           allow_credentials=config.allow_credentials,
                           # a page may read when to retry an overloaded server's 429/503
                           expose_headers=["retry-after"])
    _add_openai_routes(app, client)
    _add_operational_routes(app, client)
    return app


def _add_openai_routes(app: FastAPI, client: EngineClient) -> None:
    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models() -> ModelList:
        card = ModelCard(id=client.model_name, created=client.created,
                         max_model_len=client.max_model_len)
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        if not model_id:  # `/v1/models/`: no model is named so
            raise APIError(404, "the model '' does not exist", "model", "model_not_found")
        client.check_model(model_id)  # 404 in OpenAI's shape for any other name
        return ModelCard(id=client.model_name, created=client.created,
                         max_model_len=client.max_model_len)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
    async def embeddings(body: EmbeddingRequest) -> Any:
        return await create_embedding(client, body)

    @app.post("/v1/messages", response_model=MessagesResponse, responses={**ERRORS, **STREAM})
    async def messages(body: MessagesRequest, raw: Request) -> Any:
        return await create_message(client, body, raw)

    @app.post("/v1/messages/count_tokens", response_model=TokenCount, responses=ERRORS)
    async def messages_count_tokens(body: CountTokensRequest) -> TokenCount:
        return await count_tokens(client, body)

    @app.post("/v1/responses", responses={**ERRORS, **STREAM})
    async def responses(body: ResponsesRequest, raw: Request) -> Any:
        return await create_response(client, body, raw)

    @app.get("/tokenizer_info", responses=ERRORS)
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's shape: what a remote tokenizer (lm-evaluation-harness) needs besides
        /tokenize and /detokenize."""
        hf = client.require_llm().tokenizer.hf
        return {"tokenizer_class": type(hf).__name__, "eos_token": hf.eos_token,
                "bos_token": hf.bos_token, "pad_token": hf.pad_token,
                "unk_token": hf.unk_token, "chat_template": getattr(hf, "chat_template", None),
                "model_max_length": client.max_model_len, "vocab_size": len(hf),
                "add_bos_token": getattr(hf, "add_bos_token", None)}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagoda.__version__}

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**ERRORS, **STREAM})
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        return await create_completion(client, body, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**ERRORS, **STREAM})
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:
        return await create_chat_completion(client, body, raw)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenize(client, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return detokenize(client, body)

    @app.websocket("/v1/ws")
    async def websocket(ws: WebSocket) -> None:
        await serve_websocket(client, ws)


def _add_operational_routes(app: FastAPI, client: EngineClient) -> None:
    # The probes answer HEAD too (load balancers and uptime checkers that send HEAD got 405);
    # Starlette sends a HEAD answer's status and headers without the body.
    @app.api_route("/health", methods=["GET", "HEAD"], response_model=HealthResponse,
                   responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        status = client.check_engine()  # a dead engine thread or process turns ok into failed
        body = HealthResponse(status=status, detail=client.detail)  # type: ignore[arg-type]
        code = 200 if status == "ok" else 503
        return JSONResponse(body.model_dump(), status_code=code)

    @app.api_route("/health/live", methods=["GET", "HEAD"], response_model=HealthResponse,
                   responses={503: {"model": HealthResponse}})
    async def live() -> JSONResponse:
        """Kubernetes liveness: the process serves (loading and draining included); 503 only
        once the model failed to load or the engine died, when a restart is the cure."""
        status = client.check_engine()
        body = HealthResponse(status=status, detail=client.detail)  # type: ignore[arg-type]
        return JSONResponse(body.model_dump(), status_code=503 if status == "failed" else 200)

    @app.api_route("/health/ready", methods=["GET", "HEAD"], response_model=HealthResponse,
                   responses={503: {"model": HealthResponse}})
    async def ready() -> JSONResponse:
        """Kubernetes readiness: send traffic only when a request would be served."""
        return await health()

    @app.api_route("/metrics", methods=["GET", "HEAD"], response_class=Response)
    async def metrics() -> Response:
        return Response(client.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/debug/kv", response_model=KVCacheInfo, responses=ERRORS)
    async def debug_kv() -> KVCacheInfo:
        llm = client.require_llm()
        stats = llm.stats()
        kv = llm.info.validator  # the full-attention group's pool
        return KVCacheInfo(num_free_blocks=stats.num_free_blocks, num_total_blocks=kv.num_blocks,
                           block_size=kv.block_size, usage=stats.kv_cache_usage,
                           num_running=stats.num_running, num_waiting=stats.num_waiting,
                           num_pending=client.num_pending)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"))

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        """Live charts of this server's /metrics (static/dashboard.js)."""
        return FileResponse(str(STATIC_DIR / "dashboard.html"))

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    async def plotly_js() -> FileResponse:
        """The dashboard's chart library, served from the installed `plotly` package (nothing
        is fetched from the internet, and no copy lives in this repository)."""
        path = resources.files("plotly") / "package_data" / "plotly.min.js"
        return FileResponse(str(path), media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
