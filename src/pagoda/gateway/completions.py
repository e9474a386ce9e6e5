"""The gateway's path for `/v1/completions`, `/v1/chat/completions`, `/v1/responses` and
`/v1/messages`.

authenticate -> parse -> resolve model (virtual -> pool) -> admit (rate limits) -> cache lookup ->
forward (with retries) -> record usage, cache, metrics -> answer.

A client that disconnects cancels its request, streaming or not: the gateway closes the upstream
connection, which is how the upstream learns to stop generating.

Invariant: every admitted request releases its in-flight lease — in `finally` for complete
answers; for streams when the upstream's `[DONE]` arrives and again (a no-op then: release is
idempotent) in the stream's cleanup, which runs even if the client vanished.
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
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from redis.exceptions import RedisError

from pagoda.gateway.auth import bearer_token
from pagoda.gateway.config import KeyConfig
from pagoda.gateway.errors import bad_request, error_response, unauthorized
from pagoda.gateway.model_router import route_virtual
from pagoda.gateway.proxy import OpenStream, UpstreamUnavailable
from pagoda.gateway.rate_limit import Decision, Limits
from pagoda.gateway.response_cache import cache_key, is_cacheable
from pagoda.gateway.router import affinity_text
from pagoda.gateway.sse import StreamAssembler, can_rechunk, chunks_from_response
from pagoda.gateway.state import GatewayState
from pagoda.gateway.stream_relay import ProxiedStream, RelayOutcome, relay_events
from pagoda.gateway.upstream import UpstreamPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Surface:
    """What the gateway needs to know about one API route."""

    required: str  # the body field every request must carry
    openai_stream: bool  # SSE chunks in OpenAI's chat/completions shape, ending in [DONE]
    cacheable: bool  # the response cache can re-stream its answers (else: non-streaming only)


SURFACES = {
    "/v1/completions": Surface("prompt", True, True),
    "/v1/chat/completions": Surface("messages", True, True),
    # Responses and Anthropic Messages: routed, limited and counted, their event streams relayed
    # untouched; only their non-streaming answers are cached (the cache re-streams OpenAI chunks)
    "/v1/responses": Surface("input", False, False),
    "/v1/messages": Surface("messages", False, False),
}
# Failures of the shared state backend (Redis): the cache degrades to misses, limits to a 503.
STATE_ERRORS = (RedisError, OSError)


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
    cache_key: str | None
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


async def admit(
    state: GatewayState, request: Request, endpoint: str, chat: bool
) -> Call | Response:
    """A Call holding an in-flight lease, or the error response that refuses the request."""
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
    except ValueError:
        return bad_request("The request body is not valid JSON.")
    if not isinstance(body, dict):
        return bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return bad_request("You must provide a model parameter.", param="model")
    surface = SURFACES[endpoint]
    if surface.required not in body:
        return bad_request(f"'{surface.required}' is a required property.")
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
        return error_response(503, message, "server_error", "state_backend_unavailable")
    if not decision.allowed:
        state.metrics.rate_limited.labels(key.name, decision.reason).inc()
        message = f"Rate limit reached for {decision.reason} on key {key.name!r}."
        return error_response(
            429, message, "rate_limit_error", "rate_limit_exceeded", headers=decision.headers()
        )
    pool = state.pools[pool_name]
    ckey = None
    # Responses / Messages answers are cached whole and served only to non-streaming requests
    # (the cache re-streams OpenAI chunks only)
    if state.cache is not None and is_cacheable(body) and (
            surface.cacheable or not body.get("stream")):
        ckey = cache_key(endpoint, pool.name, body)
    return Call(key, endpoint, chat, body, model, pool, lease_id, decision, started, ckey)


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


async def serve_completion(state: GatewayState, request: Request, endpoint: str) -> Response:
    chat = endpoint.endswith("/chat/completions")
    call = await admit(state, request, endpoint, chat)
    if isinstance(call, Response):
        return call
    streaming = False
    try:
        if call.cache_key is not None:
            cached = await _cache_get(state, call.cache_key)
            state.metrics.cache.labels(call.pool.name, "hit" if cached else "miss").inc()
            if cached is not None:
                return _cached_answer(state, call, cached)
        upstream_body = {**call.body, "model": call.pool.upstream_model}
        if call.stream and SURFACES[endpoint].openai_stream:
            options = call.body.get("stream_options") or {}
            upstream_body["stream_options"] = {**options, "include_usage": True}
            response = await _forward_stream(state, call, upstream_body)
            streaming = isinstance(response, ProxiedStream)  # it now owns the lease
            return response
        answer = await _unless_client_leaves(request, _forward(state, call, upstream_body))
        if answer is None:  # nobody to answer; the upstream saw its connection drop
            _observe(state, call, "none", 499)
            return Response(status_code=499)
        return answer
    except UpstreamUnavailable as exc:
        _observe(state, call, "none", 502)
        message = f"No upstream of `{call.pool.name}` could answer: {exc.detail}"
        return error_response(502, message, "upstream_error", "upstream_unavailable")
    finally:
        if not streaming:
            await _finish(state, call)


async def _unless_client_leaves(request: Request, work: Awaitable[Response]) -> Response | None:
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


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the request body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finish(state: GatewayState, call: Call) -> None:
    """Record a complete answer's tokens and release its lease, in one round trip."""
    try:
        await state.limiter.finish(call.key.name, call.lease_id, call.num_tokens)
    except STATE_ERRORS as exc:  # the lease expires on its own (rate_limit.LEASE_S)
        logger.warning("could not record usage and release a lease: %s", type(exc).__name__)


async def _release(state: GatewayState, call: Call) -> None:
    try:
        await state.limiter.release(call.key.name, call.lease_id)
    except STATE_ERRORS as exc:  # the lease expires on its own (rate_limit.LEASE_S)
        logger.warning("could not release a concurrency lease: %s", type(exc).__name__)


async def _cache_get(state: GatewayState, key: str) -> bytes | None:
    try:
        return await state.cache.get(key)
    except STATE_ERRORS as exc:
        logger.warning("response cache unavailable: %s", type(exc).__name__)
        return None


async def _cache_put(state: GatewayState, key: str, value: bytes) -> None:
    try:
        await state.cache.put(key, value)
    except STATE_ERRORS as exc:
        logger.warning("response cache unavailable: %s", type(exc).__name__)


def _observe(state: GatewayState, call: Call, upstream: str, status: int | str) -> None:
    labels = (call.key.name, call.pool.name, upstream)
    state.metrics.requests.labels(*labels, str(status)).inc()
    state.metrics.latency.labels(*labels).observe(time.perf_counter() - call.started)


def _cached_answer(state: GatewayState, call: Call, cached: bytes) -> Response:
    headers = call.headers("hit", None)
    _observe(state, call, "cache", 200)
    body = json.loads(cached)
    if call.public_model is not None:
        body["model"] = call.public_model
    if not call.stream:
        return Response(json.dumps(body).encode(), media_type="application/json", headers=headers)
    options = call.body.get("stream_options") or {}
    events = chunks_from_response(body, call.chat, bool(options.get("include_usage")))

    async def replay():
        for event in events:
            yield event

    return StreamingResponse(replay(), media_type="text/event-stream", headers=headers)


async def _record_usage(state: GatewayState, call: Call, upstream: str, usage: Any) -> None:
    num_tokens = state.metrics.record_usage(call.key.name, call.pool.name, upstream, usage)
    try:
        await state.limiter.record_tokens(call.key.name, call.lease_id, num_tokens)
    except STATE_ERRORS as exc:
        logger.warning("could not record token usage: %s", type(exc).__name__)


async def _forward(state: GatewayState, call: Call, upstream_body: dict[str, Any]) -> Response:
    policy = state.policies[call.pool.name]
    text = affinity_text(call.body)
    reply = await state.forwarder.send(call.pool, policy, text, call.endpoint, upstream_body)
    content = reply.content
    if reply.status == 200:
        try:
            payload = json.loads(content)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            usage = payload.get("usage")
            call.num_tokens = state.metrics.record_usage(
                call.key.name, call.pool.name, reply.upstream.name, usage
            )  # recorded with the lease's release, before the answer leaves
            if call.public_model is not None and payload.get("model") != call.public_model:
                payload["model"] = call.public_model
                content = json.dumps(payload).encode()
            if call.cache_key is not None and (
                    can_rechunk(payload) or not SURFACES[call.endpoint].openai_stream):
                await _cache_put(state, call.cache_key, content)
    _observe(state, call, reply.upstream.name, reply.status)
    cache = "miss" if call.cache_key is not None else "bypass"
    headers = call.headers(cache, reply.upstream.name)
    if reply.retry_after is not None:
        headers["retry-after"] = reply.retry_after
    return Response(content, status_code=reply.status, media_type=reply.content_type,
                    headers=headers)


async def _forward_stream(
    state: GatewayState, call: Call, upstream_body: dict[str, Any]
) -> Response:
    policy = state.policies[call.pool.name]
    text = affinity_text(call.body)
    opened = await state.forwarder.open_stream(
        call.pool, policy, text, call.endpoint, upstream_body
    )
    cache = "miss" if call.cache_key is not None else "bypass"
    if not isinstance(opened, OpenStream):  # the upstream's own error: passed through whole
        _observe(state, call, opened.upstream.name, opened.status)
        headers = call.headers(cache, None)
        if opened.retry_after is not None:
            headers["retry-after"] = opened.retry_after
        return Response(opened.content, status_code=opened.status,
                        media_type=opened.content_type, headers=headers)
    outcome = RelayOutcome()
    assembler = StreamAssembler(chat=call.chat) if call.cache_key is not None else None
    options = call.body.get("stream_options") or {}
    upstream = opened.upstream

    async def on_usage(usage: dict[str, Any]) -> None:
        await _record_usage(state, call, upstream.name, usage)

    async def on_complete(body: dict[str, Any]) -> None:
        await _cache_put(state, call.cache_key, json.dumps(body).encode())

    events = relay_events(
        opened, outcome, wants_usage=bool(options.get("include_usage")),
        public_model=call.public_model, assembler=assembler,
        on_usage=on_usage, on_complete=on_complete, on_done=lambda: _release(state, call),
        ends_with_done=SURFACES[call.endpoint].openai_stream,
    )

    async def cleanup() -> None:
        try:
            await opened.close()
            if outcome.upstream_failed:
                call.pool.record_failure(upstream)
            status = 502 if outcome.upstream_failed else (200 if outcome.saw_done else 499)
            _observe(state, call, upstream.name, status)
        finally:
            await _release(state, call)

    return ProxiedStream(events, cleanup, headers=call.headers(cache, upstream.name))
