"""One request through the gateway, from arrival to its lease's release; shared by every HTTP
surface (completions.py, embeddings.py).

receive (authenticate, read and parse the body) -> admit (resolve model -> pool, rate limits) ->
[the surface's own path] -> finish (record usage, release the lease) and observe (metrics).

Invariant: every admitted request releases its in-flight lease exactly once in effect — `finish`
for complete answers; for streams `release` when the upstream's `[DONE]` arrives and again (a
no-op then: release is idempotent) in the stream's cleanup, which runs even if the client vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from pagoda.gateway.auth import bearer_token
from pagoda.gateway.config import KeyConfig
from pagoda.gateway.errors import bad_request, error_response, unauthorized
from pagoda.gateway.model_router import route_virtual
from pagoda.gateway.proxy import UpstreamUnavailable
from pagoda.gateway.rate_limit import Decision, Limits
from pagoda.gateway.response_cache import cache_key, is_cacheable
from pagoda.gateway.state import GatewayState
from pagoda.gateway.upstream import UpstreamPool

logger = logging.getLogger(__name__)

# Failures of the shared state backend (Redis): caches degrade to misses, limits to a 503.
STATE_ERRORS = (RedisError, OSError)


@dataclass(frozen=True)
class Surface:
    """What the gateway needs to know about one API route."""

    required: str  # the body field every request must carry
    openai_stream: bool  # SSE chunks in OpenAI's chat/completions shape, ending in [DONE]
    # response cache: "any" (answers re-streamed as OpenAI chunks too), "json" (non-streaming
    # requests only), "off" (embeddings have their own per-input cache)
    response_cache: Literal["any", "json", "off"]


SURFACES = {
    "/v1/completions": Surface("prompt", True, "any"),
    "/v1/chat/completions": Surface("messages", True, "any"),
    # Responses and Anthropic Messages: routed, limited and counted, their event streams relayed
    # untouched; only their non-streaming answers are cached (the cache re-streams OpenAI chunks)
    "/v1/responses": Surface("input", False, "json"),
    "/v1/messages": Surface("messages", False, "json"),
    "/v1/embeddings": Surface("input", False, "off"),
}


@dataclass(frozen=True, slots=True)
class Incoming:
    """An authenticated request whose body is a JSON object naming a model (not yet admitted)."""

    key: KeyConfig
    body: dict[str, Any]
    model: str
    started: float  # perf_counter at arrival


@dataclass(slots=True)
class Call:
    """One admitted request on its way through the gateway."""

    key: KeyConfig
    endpoint: str
    chat: bool
    body: dict[str, Any]
    requested_model: str
    pool: UpstreamPool
    lease_id: str
    decision: Decision
    started: float
    cache_key: str | None  # response-cache key; None when the response cache is not used
    num_tokens: int = 0  # usage of a complete answer, recorded when its lease is released

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def public_model(self) -> str | None:
        """Set when upstream chunks must have `model` rewritten to the pool's public name."""
        renamed = self.requested_model != self.pool.name or self.pool.config.upstream_model
        return self.pool.name if renamed else None

    def headers(self, cache: str, upstream: str | None) -> dict[str, str]:
        out = {**self.decision.headers(), "x-pagoda-routed-to": self.pool.name, "x-cache": cache}
        if upstream is not None:
            out["x-pagoda-upstream"] = upstream
        return out


def resolve_pool(state: GatewayState, model: str, body: dict[str, Any]) -> str | None:
    if model in state.pools:
        return model
    virtual = state.config.virtual_model(model)
    return route_virtual(virtual, body) if virtual is not None else None


async def receive(state: GatewayState, request: Request, endpoint: str) -> Incoming | Response:
    """The authenticated, parsed request, or the error response that refuses it."""
    started = time.perf_counter()
    token = bearer_token(request.headers.get("authorization")) or \
        request.headers.get("x-api-key")  # Anthropic's clients
    key = await state.keys.authenticate_async(token)
    if key is None:
        return unauthorized("Missing or invalid API key. Send `Authorization: Bearer <key>`.")
    raw = await _read_body(request, state.config.max_body_bytes)
    if raw is None:
        message = f"The request body exceeds {state.config.max_body_bytes} bytes."
        return error_response(413, message, "invalid_request_error", "request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # a few KB of brackets exhaust the parser's stack
        return bad_request("The request body is not valid JSON.")
    if not isinstance(body, dict):
        return bad_request("The request body must be a JSON object.")
    # the fields the gateway itself acts on (the upstream checks the rest)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return bad_request("'stream' must be a boolean.", param="stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        return bad_request("'stream_options' must be an object.", param="stream_options")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return bad_request("You must provide a model parameter.", param="model")
    required = SURFACES[endpoint].required
    if required not in body:
        return bad_request(f"'{required}' is a required property.", param=required)
    return Incoming(key, body, model, started)


async def admit(
    state: GatewayState, incoming: Incoming, endpoint: str, chat: bool
) -> Call | Response:
    """A Call holding an in-flight lease, or the error response that refuses the request."""
    key, body, model = incoming.key, incoming.body, incoming.model
    pool_name = resolve_pool(state, model, body)
    if pool_name is None or not key.allows(model):
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_response(404, message, "invalid_request_error", "model_not_found")
    lease_id = uuid.uuid4().hex
    try:
        decision = await state.limiter.acquire(key.name, Limits.of(key), lease_id)
    except STATE_ERRORS as exc:
        logger.warning("rate-limit backend unavailable: %s", type(exc).__name__)
        message = "The rate-limit backend is unavailable; retry shortly."
        # Retry-After: clients (openai's included) back off and retry; Redis usually returns
        # within seconds, and the limiter reconnects on its next command.
        return error_response(503, message, "server_error", "state_backend_unavailable",
                              headers={"Retry-After": "1"})
    if not decision.allowed:
        state.metrics.rate_limited.labels(key.name, decision.reason).inc()
        message = f"Rate limit reached for {decision.reason} on key {key.name!r}."
        return error_response(
            429, message, "rate_limit_error", "rate_limit_exceeded", headers=decision.headers()
        )
    pool = state.pools[pool_name]
    policy = SURFACES[endpoint].response_cache
    ckey = None
    if state.cache is not None and is_cacheable(body) and (
            policy == "any" or (policy == "json" and not body.get("stream"))):
        ckey = cache_key(endpoint, pool.name, body)
    return Call(key, endpoint, chat, body, model, pool, lease_id, decision, incoming.started,
                ckey)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed `limit` bytes (never reads past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def unless_client_leaves(request: Request, work: Awaitable[Response]) -> Response | None:
    """Await `work`, unless the client disconnects first: then cancel it — which closes the
    upstream connection, telling the upstream to stop generating — and return None."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def answer_unless_client_leaves(state: GatewayState, call: Call, request: Request,
                                      work: Awaitable[Response]) -> Response:
    """`work`'s answer, or a 499 (counted) when the client left first."""
    answer = await unless_client_leaves(request, work)
    if answer is None:  # nobody to answer; the upstream saw its connection drop
        observe(state, call, "none", 499)
        return Response(status_code=499)
    return answer


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the request body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finish(state: GatewayState, call: Call) -> None:
    """Record a complete answer's tokens and release its lease, in one round trip."""
    try:
        await state.limiter.finish(call.key.name, call.lease_id, call.num_tokens)
    except STATE_ERRORS as exc:  # the lease expires on its own (rate_limit.LEASE_S)
        logger.warning("could not record usage and release a lease: %s", type(exc).__name__)


async def release(state: GatewayState, call: Call) -> None:
    try:
        await state.limiter.release(call.key.name, call.lease_id)
    except STATE_ERRORS as exc:  # the lease expires on its own (rate_limit.LEASE_S)
        logger.warning("could not release a concurrency lease: %s", type(exc).__name__)


def observe(state: GatewayState, call: Call, upstream: str, status: int | str) -> None:
    labels = (call.key.name, call.pool.name, upstream)
    state.metrics.requests.labels(*labels, str(status)).inc()
    state.metrics.latency.labels(*labels).observe(time.perf_counter() - call.started)


def unavailable(state: GatewayState, call: Call, exc: UpstreamUnavailable) -> Response:
    """The gateway's own 502: no upstream of the pool answered at all."""
    observe(state, call, "none", 502)
    message = f"No upstream of `{call.pool.name}` could answer: {exc.detail}"
    return error_response(502, message, "upstream_error", "upstream_unavailable")
