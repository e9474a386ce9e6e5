"""`/v1/ws`: a WebSocket passed through, message for message, to an upstream's `/v1/ws`.

The gateway does not interpret the protocol. It authenticates (Bearer header, or `api_key` query
parameter for browsers, which cannot set headers on WebSockets; the client's key never goes
upstream, the upstream's own key from the config does), picks the pool from the `model`
query parameter (virtual models route by their default), admits the connection against the key's
limits — one request, holding one concurrency slot while open — and then pumps frames both ways
until either side closes. A client message naming the connection's model is renamed to the
upstream's `upstream_model`, as on HTTP. Upstream JSON messages carrying `usage` count toward
tokens per minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from urllib.parse import urlencode

from fastapi import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from pagoda.gateway.auth import bearer_token
from pagoda.gateway.call import STATE_ERRORS
from pagoda.gateway.rate_limit import Limits
from pagoda.gateway.state import GatewayState
from pagoda.gateway.upstream import Upstream, UpstreamPool

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013

logger = logging.getLogger(__name__)


async def _connect(
    state: GatewayState, pool: UpstreamPool, query: str
) -> tuple[ClientConnection, Upstream] | None:
    tried: set[str] = set()
    for _ in range(state.config.retry.max_attempts):
        candidates = pool.candidates(exclude=tried)
        if not candidates:
            return None
        upstream = state.policies[pool.name].choose(candidates, "")
        tried.add(upstream.name)
        url = "ws" + upstream.url[len("http"):] + "/v1/ws" + (f"?{query}" if query else "")
        try:
            conn = await connect(
                url, open_timeout=state.config.retry.connect_timeout_s, proxy=None,
                max_size=None, compression=None, additional_headers=upstream.auth_headers,
            )
        except (OSError, WebSocketException, asyncio.TimeoutError):
            pool.record_failure(upstream)
            continue
        return conn, upstream
    return None


async def serve_websocket(state: GatewayState, ws: WebSocket) -> None:
    token = bearer_token(ws.headers.get("authorization")) or ws.query_params.get("api_key")
    key = await state.keys.authenticate_async(token)
    if key is None:
        await ws.close(code=POLICY_VIOLATION, reason="missing or invalid API key")
        return
    model = ws.query_params.get("model") or state.config.models[0].name
    virtual = state.config.virtual_model(model)
    pool_name = virtual.default if virtual is not None else model
    if pool_name not in state.pools or not key.allows(model):
        await ws.close(code=POLICY_VIOLATION, reason=f"model {model!r} not available")
        return
    lease_id = uuid.uuid4().hex
    try:
        decision = await state.limiter.acquire(key.name, Limits.of(key), lease_id)
    except STATE_ERRORS as exc:  # as HTTP's 503: the shared limits cannot be read right now
        logger.warning("rate-limit backend unavailable: %s", type(exc).__name__)
        await ws.close(code=TRY_AGAIN_LATER, reason="the rate-limit backend is unavailable")
        return
    if not decision.allowed:
        state.metrics.rate_limited.labels(key.name, decision.reason).inc()
        await ws.close(code=TRY_AGAIN_LATER, reason=f"rate limit reached for {decision.reason}")
        return
    pool = state.pools[pool_name]
    params = [(k, v) for k, v in ws.query_params.multi_items() if k != "api_key"]
    params = [(k, pool.upstream_model if k == "model" else v) for k, v in params]
    try:
        connected = await _connect(state, pool, urlencode(params))
        if connected is None:
            await ws.close(code=TRY_AGAIN_LATER, reason="no upstream available")
            return
        conn, upstream = connected
        upstream.num_outstanding += 1
        try:
            await ws.accept()
            aliases = {model, pool.name}  # what a message may call this connection's model
            await _pump(state, ws, conn, key.name, lease_id,
                        lambda text: _rename_model(text, aliases, pool.upstream_model))
        finally:
            upstream.num_outstanding -= 1
            await conn.close()
        state.metrics.requests.labels(key.name, pool.name, upstream.name, "ws").inc()
    finally:
        with contextlib.suppress(*STATE_ERRORS):  # the lease expires with its TTL then
            await state.limiter.release(key.name, lease_id)


def _rename_model(text: str, aliases: set[str], upstream_model: str) -> str:
    """A client message naming this connection's model (by its public name or alias) is sent
    upstream with the upstream's own name for it, as HTTP requests are."""
    if '"model"' not in text:
        return text
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return text  # not JSON: the upstream answers it with its own error
    if not isinstance(message, dict) or message.get("model") not in aliases:
        return text
    return json.dumps({**message, "model": upstream_model})


async def _pump(
    state: GatewayState, ws: WebSocket, conn: ClientConnection, key: str, lease_id: str,
    rewrite: Callable[[str], str],
) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await conn.send(rewrite(message["text"]))
            elif message.get("bytes") is not None:
                await conn.send(message["bytes"])

    async def upstream_to_client() -> None:
        async for message in conn:
            if isinstance(message, str):
                if '"usage"' in message:
                    await _count_usage(state, key, lease_id, message)
                await ws.send_text(message)
            else:
                await ws.send_bytes(message)
        with contextlib.suppress(RuntimeError):
            await ws.close()

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _count_usage(state: GatewayState, key: str, lease_id: str, message: str) -> None:
    try:
        usage = json.loads(message).get("usage")
    except (ValueError, AttributeError):
        return
    if isinstance(usage, dict):
        total = sum(v for k, v in usage.items()
                    if k in ("prompt_tokens", "completion_tokens") and isinstance(v, int))
        try:
            await state.limiter.record_tokens(key, lease_id, total)
        except STATE_ERRORS as exc:  # as HTTP's: the answer still goes out
            logger.warning("could not record token usage: %s", type(exc).__name__)
