"""The gateway's path for `/v1/completions`, `/v1/chat/completions`, `/v1/responses` and
`/v1/messages` (receiving and admitting a request is call.py's).

receive -> admit (model -> pool, rate limits) -> response-cache lookup -> forward (with retries)
-> record usage, cache, metrics -> answer.

A client that disconnects cancels its request, streaming or not: the gateway closes the upstream
connection, which is how the upstream learns to stop generating. Every admitted request releases
its lease (see call.py): in `finally` for complete answers, in the stream's cleanup for streams.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagoda.gateway.call import (
    STATE_ERRORS,
    SURFACES,
    Call,
    admit,
    answer_unless_client_leaves,
    finish,
    observe,
    receive,
    release,
    unavailable,
)
from pagoda.gateway.errors import in_route_shape
from pagoda.gateway.proxy import OpenStream, UpstreamUnavailable
from pagoda.gateway.router import affinity_text
from pagoda.gateway.sse import StreamAssembler, can_rechunk, chunks_from_response
from pagoda.gateway.state import GatewayState
from pagoda.gateway.stream_relay import ProxiedStream, RelayOutcome, relay_events

logger = logging.getLogger(__name__)


async def serve_completion(state: GatewayState, request: Request, endpoint: str) -> Response:
    chat = endpoint.endswith("/chat/completions")
    incoming = await receive(state, request, endpoint)
    if isinstance(incoming, Response):
        return in_route_shape(incoming, endpoint)
    call = await admit(state, incoming, endpoint, chat)
    if isinstance(call, Response):
        return in_route_shape(call, endpoint)
    streaming = False
    try:
        if call.cache_key is not None:
            cached = await _cache_get(state, call.cache_key)
            state.metrics.cache.labels(call.pool.name, "hit" if cached else "miss").inc()
            if cached is not None:
                return _cached_answer(state, call, cached)
        upstream_body = {**call.body, "model": call.pool.upstream_model}
        if call.stream:  # relayed event by event (Responses' and Anthropic's streams too)
            if SURFACES[endpoint].openai_stream:  # usage comes in a chunk asked for
                options = call.body.get("stream_options") or {}
                upstream_body["stream_options"] = {**options, "include_usage": True}
            response = await _forward_stream(state, call, upstream_body)
            streaming = isinstance(response, ProxiedStream)  # it now owns the lease
            return response
        return await answer_unless_client_leaves(state, call, request,
                                                 forward(state, call, upstream_body))
    except UpstreamUnavailable as exc:
        return in_route_shape(unavailable(state, call, exc), endpoint)
    finally:
        if not streaming:
            await finish(state, call)


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


def _cached_answer(state: GatewayState, call: Call, cached: bytes) -> Response:
    headers = call.headers("hit", None)
    observe(state, call, "cache", 200)
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


async def forward(state: GatewayState, call: Call, upstream_body: dict[str, Any]) -> Response:
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
    observe(state, call, reply.upstream.name, reply.status)
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
        observe(state, call, opened.upstream.name, opened.status)
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

    openai_stream = SURFACES[call.endpoint].openai_stream
    events = relay_events(
        # Responses' and Anthropic's usage rides in their own events: never dropped
        opened, outcome, wants_usage=bool(options.get("include_usage")) or not openai_stream,
        public_model=call.public_model, assembler=assembler,
        on_usage=on_usage, on_complete=on_complete, on_done=lambda: release(state, call),
        ends_with_done=openai_stream,
    )

    async def cleanup() -> None:
        try:
            await opened.close()
            if outcome.upstream_failed:
                call.pool.record_failure(upstream)
            status = 502 if outcome.upstream_failed else (200 if outcome.saw_done else 499)
            observe(state, call, upstream.name, status)
        finally:
            await release(state, call)

    return ProxiedStream(events, cleanup, headers=call.headers(cache, upstream.name))
