"""The gateway's path for `/v1/embeddings`, with the per-input embedding cache.

receive -> parse (every 400 before any lookup or upstream call) -> admit (pool, limits) ->
look up every input -> compute the misses in ONE upstream request -> store them -> answer all
inputs in the client's order and encoding.

- The misses sent upstream are the distinct missing keys, each once, in order of first appearance;
  the gateway asks for base64 (exact float32 bytes, the cache's form) whatever the client asked.
- Opt-out per request, with the request header `Cache-Control`: `no-cache` skips the lookup (every
  input is computed) but stores the results; `no-store` neither reads nor writes. A request with
  `no-store`, with fields the gateway does not know (embedding_request.py), or to a gateway whose
  embedding cache is off, goes upstream whole and its answer comes back as sent (only `model`
  renamed, as on every route; x-cache: bypass).
- Usage counts what the upstream computed for this request: inputs served from the cache cost no
  tokens, neither in `usage.prompt_tokens` nor against tokens per minute (a full hit reports 0).
- A cache backend failure (Redis down) is a miss on lookup and a no-op on store, never an error.
- The upstream's own non-200 answer is passed through; when the upstream was sent other inputs
  than the client's (some were hits or duplicates), its `input[k]` references (in `param` and
  `message`) are renumbered to the client's indexes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagoda.gateway.call import (
    STATE_ERRORS,
    Call,
    admit,
    answer_unless_client_leaves,
    finish,
    observe,
    receive,
    unavailable,
)
from pagoda.gateway.completions import forward
from pagoda.gateway.embedding_cache import embedding_key
from pagoda.gateway.embedding_request import EmbeddingRequest, InvalidField, parse_embedding_request
from pagoda.gateway.embedding_vectors import (
    MalformedEmbeddings,
    decode_embeddings,
    render_embeddings,
)
from pagoda.gateway.errors import bad_request, error_response
from pagoda.gateway.proxy import Reply, UpstreamUnavailable
from pagoda.gateway.state import GatewayState

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/embeddings"
_INPUT_REF = re.compile(r"input\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache holds for one request's inputs."""

    keys: tuple[str, ...]  # one per client input, in the client's order
    cached: tuple[bytes | None, ...]  # one per client input: its vector if the cache had it
    misses: tuple[int, ...]  # client indexes to compute: the first input of each missing key

    @property
    def num_hits(self) -> int:
        return sum(v is not None for v in self.cached)


@dataclass(frozen=True, slots=True)
class Computed:
    """The upstream's answer for the misses, in `Lookup.misses` order (empty: nothing missed)."""

    vectors: tuple[bytes, ...]
    upstream: str | None  # the replica that computed them
    num_tokens: int  # its usage.prompt_tokens


def cache_directives(request: Request) -> set[str]:
    """The request's Cache-Control directives, lower-cased, without arguments."""
    header = request.headers.get("cache-control", "")
    return {part.split("=", 1)[0].strip().lower() for part in header.split(",") if part.strip()}


async def serve_embeddings(state: GatewayState, request: Request) -> Response:
    incoming = await receive(state, request, ENDPOINT)
    if isinstance(incoming, Response):
        return incoming
    parsed = parse_embedding_request(incoming.body)
    if isinstance(parsed, InvalidField):
        return bad_request(parsed.message, param=parsed.param)
    call = await admit(state, incoming, ENDPOINT, chat=False)
    if isinstance(call, Response):
        return call
    try:
        work = _answer(state, call, parsed, cache_directives(request))
        return await answer_unless_client_leaves(state, call, request, work)
    except UpstreamUnavailable as exc:
        return unavailable(state, call, exc)
    finally:
        await finish(state, call)


async def _answer(
    state: GatewayState, call: Call, req: EmbeddingRequest, directives: set[str]
) -> Response:
    if state.embedding_cache is None or "no-store" in directives or req.unknown_fields:
        return await forward(state, call, {**call.body, "model": call.pool.upstream_model})
    lookup = await _lookup(state, call, req, read="no-cache" not in directives)
    computed = Computed((), None, 0)
    if lookup.misses:
        outcome = await _compute(state, call, req, lookup)
        if isinstance(outcome, Response):
            return outcome
        computed = outcome
        missed = [lookup.keys[i] for i in lookup.misses]
        ttl_s = state.config.embedding_cache.ttl_for(call.pool.name)
        await _store(state, list(zip(missed, computed.vectors, strict=True)), ttl_s)
    return await _respond(state, call, req, lookup, computed)


async def _respond(
    state: GatewayState, call: Call, req: EmbeddingRequest, lookup: Lookup, computed: Computed
) -> Response:
    """Every input's vector in the client's order: from the cache, or from this computation
    (which may also serve later duplicates of a missing input)."""
    fresh = dict(zip((lookup.keys[i] for i in lookup.misses), computed.vectors, strict=True))
    vectors = [v if v is not None else fresh[k]
               for k, v in zip(lookup.keys, lookup.cached, strict=True)]
    observe(state, call, computed.upstream or "cache", 200)
    num_hits = lookup.num_hits
    cache = "hit" if not lookup.misses else ("partial" if num_hits else "miss")
    headers = {**call.headers(cache, computed.upstream), "x-pagoda-cache-hits": str(num_hits)}
    render = (req.encoding_format, call.pool.name, computed.num_tokens)
    # orjson prints the largest answer (2048 x 384 floats) in ~25 ms: inline
    return Response(render_embeddings(vectors, *render), media_type="application/json",
                    headers=headers)


async def _lookup(state: GatewayState, call: Call, req: EmbeddingRequest, read: bool) -> Lookup:
    pool = call.pool
    keys = tuple(embedding_key(pool.name, pool.upstream_model, req.vector_options, item)
                 for item in req.inputs)
    cached: list[bytes | None] = [None] * len(keys)
    if read:
        try:
            cached = await state.embedding_cache.get_many(keys)
        except STATE_ERRORS as exc:
            logger.warning("embedding cache unavailable: %s", type(exc).__name__)
        num_hits = sum(v is not None for v in cached)
        state.metrics.embedding_cache_hits.labels(pool.name).inc(num_hits)
        state.metrics.embedding_cache_misses.labels(pool.name).inc(len(keys) - num_hits)
    first: dict[str, int] = {}  # missing key -> the first client index holding it
    for i, (key, vector) in enumerate(zip(keys, cached, strict=True)):
        if vector is None:
            first.setdefault(key, i)
    return Lookup(keys, tuple(cached), tuple(first.values()))


async def _store(state: GatewayState, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
    try:
        await state.embedding_cache.put_many(entries, ttl_s)
    except STATE_ERRORS as exc:
        logger.warning("embedding cache unavailable: %s", type(exc).__name__)


async def _compute(
    state: GatewayState, call: Call, req: EmbeddingRequest, lookup: Lookup
) -> Computed | Response:
    """One upstream request for the misses, or the response that reports why it failed."""
    inputs = [req.inputs[i] for i in lookup.misses]
    body: dict[str, Any] = {
        "model": call.pool.upstream_model,
        "input": [x if isinstance(x, str) else list(x) for x in inputs],
        "encoding_format": "base64",
    }
    for name in ("dimensions", "truncate_prompt_tokens", "user"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    affinity = inputs[0] if isinstance(inputs[0], str) else ""
    policy = state.policies[call.pool.name]
    reply = await state.forwarder.send(call.pool, policy, affinity, ENDPOINT, body)
    if reply.status != 200:
        return _passed_through(state, call, reply, lookup)
    try:
        payload = json.loads(reply.content)
        vectors = decode_embeddings(payload, len(inputs))
    except (ValueError, MalformedEmbeddings) as exc:
        observe(state, call, reply.upstream.name, 502)
        message = f"Upstream {reply.upstream.name} sent a malformed embeddings answer: {exc}"
        return error_response(502, message, "upstream_error", "bad_upstream_response")
    call.num_tokens = state.metrics.record_usage(
        call.key.name, call.pool.name, reply.upstream.name, payload.get("usage")
    )  # recorded with the lease's release
    return Computed(tuple(vectors), reply.upstream.name, call.num_tokens)


def _passed_through(state: GatewayState, call: Call, reply: Reply, lookup: Lookup) -> Response:
    """The upstream's non-200 answer, its `input[k]` references renumbered when the upstream saw
    a different list than the client sent (k indexes the misses; the client knows its own)."""
    content = reply.content
    if lookup.misses != tuple(range(len(lookup.keys))):
        content = _renumbered(content, lookup.misses)
    observe(state, call, reply.upstream.name, reply.status)
    headers = call.headers("miss", reply.upstream.name)
    if reply.retry_after is not None:
        headers["retry-after"] = reply.retry_after
    return Response(content, status_code=reply.status, media_type=reply.content_type,
                    headers=headers)


def _renumbered(content: bytes, misses: tuple[int, ...]) -> bytes:
    try:
        payload = json.loads(content)
    except ValueError:
        return content
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return content

    def client_ref(match: re.Match[str]) -> str:
        k = int(match.group(1))
        return f"input[{misses[k]}]" if k < len(misses) else match.group(0)

    for field in ("param", "message"):
        if isinstance(error.get(field), str):
            error[field] = _INPUT_REF.sub(client_ref, error[field])
    return json.dumps(payload).encode()
