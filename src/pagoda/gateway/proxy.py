"""Sending one request to a pool, with retries that never duplicate output the client has seen.

Retry rule: an attempt may be retried on another upstream (never the same one) if the upstream
could not take it — a connection error, a timeout, a 502/503/504 (a proxy's failure, an
overloaded or draining replica), or, for streams, a failure before the first body chunk arrived
(the first chunk is read before the gateway commits its own response headers). Every other
answer is the upstream's own word on this request and is passed through unretried: a 4xx is the
client's problem, and a 500 is the replica failing *this* request, which another replica would
fail the same way (retrying it everywhere only multiplied the damage and hid the error behind a
502). When every attempt got a 502/503/504, the last one is passed through (with its
Retry-After) rather than replaced by the gateway's own 502. Once a stream's first chunk has
been handed over, a failure ends the stream; it is never retried.

Every retried attempt counts toward the upstream's passive ejection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from pagoda.gateway.config import RetryConfig
from pagoda.gateway.metrics import GatewayMetrics
from pagoda.gateway.router import Policy
from pagoda.gateway.upstream import Upstream, UpstreamPool
from pagoda.gateway.upstream_client import UPSTREAM_ERRORS, UpstreamClient

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({502, 503, 504})
T = TypeVar("T")


class UpstreamUnavailable(Exception):
    """Every allowed attempt failed before answering; `detail` says how the last one failed."""

    def __init__(self, detail: str, num_attempts: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.num_attempts = num_attempts


class UpstreamClosedEarly(aiohttp.ClientPayloadError):
    """The upstream ended a 200 stream without sending a byte."""


@dataclass(slots=True)
class Reply:
    """A complete (non-streaming) upstream answer."""

    upstream: Upstream
    status: int
    content: bytes
    content_type: str
    retry_after: str | None = None


@dataclass(slots=True)
class OpenStream:
    """An upstream stream whose status was 200 and whose first chunk has been read."""

    upstream: Upstream
    response: aiohttp.ClientResponse
    first_chunk: bytes
    _closed: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises one of UPSTREAM_ERRORS if the stream breaks."""
        yield self.first_chunk
        while True:
            chunk = await self.response.content.readany()
            if not chunk:
                return
            yield chunk

    async def close(self) -> None:
        """Closing mid-stream drops the connection, which is how the upstream learns to cancel;
        a stream read to the end gives its connection back to the pool instead."""
        if not self._closed:
            self._closed = True
            self.upstream.num_outstanding -= 1
            if self.response.content.at_eof():
                self.response.release()
            else:
                self.response.close()


class Forwarder:
    def __init__(self, client: UpstreamClient, retry: RetryConfig, metrics: GatewayMetrics) -> None:
        self.client = client
        self.retry = retry
        self.metrics = metrics

    def _failed(self, pool: UpstreamPool, upstream: Upstream) -> None:
        if pool.record_failure(upstream):
            logger.warning("upstream %s ejected for %.0f s after consecutive failures",
                           upstream.name, pool.health.eject_s)
        self.metrics.retries.labels(pool.name, upstream.name).inc()

    def _next(
        self, pool: UpstreamPool, policy: Policy, text: str, tried: set[str], detail: str
    ) -> Upstream:
        candidates = pool.candidates(exclude=tried)
        if not candidates:
            raise UpstreamUnavailable(f"{detail} (all {len(tried)} upstreams tried)", len(tried))
        upstream = policy.choose(candidates, text)
        tried.add(upstream.name)
        upstream.num_requests += 1
        return upstream

    async def _first_final(
        self, pool: UpstreamPool, policy: Policy, text: str,
        attempt: Callable[[Upstream], Awaitable[T]],
    ) -> T | Reply:
        """Runs `attempt` on upstreams in the policy's order until one gives an answer that is
        not a connection failure or a 502/503/504. When every attempt got a 502/503/504 the
        latest is passed through (with its Retry-After) rather than replaced by our own 502."""
        tried: set[str] = set()
        detail = "no upstream configured"
        last: Reply | None = None
        for _ in range(self.retry.max_attempts):
            try:
                upstream = self._next(pool, policy, text, tried, detail)
            except UpstreamUnavailable:
                if last is not None:
                    return last
                raise
            try:
                result = await attempt(upstream)
            except UPSTREAM_ERRORS as exc:
                detail = f"{upstream.name}: {type(exc).__name__}"
                self._failed(pool, upstream)
                continue
            if isinstance(result, Reply) and result.status in RETRYABLE_STATUS:
                detail = f"{upstream.name}: HTTP {result.status}"
                self._failed(pool, upstream)
                last = result
                continue
            return result
        if last is not None:
            return last
        raise UpstreamUnavailable(detail, len(tried))

    async def send(
        self, pool: UpstreamPool, policy: Policy, text: str, path: str, body: dict[str, Any]
    ) -> Reply:
        async def attempt(upstream: Upstream) -> Reply:
            upstream.num_outstanding += 1
            try:
                status, content_type, content, retry_after = await self.client.post_json(
                    upstream.url + path, body, upstream.auth_headers)
            finally:
                upstream.num_outstanding -= 1
            if status < 500:
                upstream.record_success()
            return Reply(upstream, status, content, content_type or "application/json",
                         retry_after)

        return await self._first_final(pool, policy, text, attempt)

    async def open_stream(
        self, pool: UpstreamPool, policy: Policy, text: str, path: str, body: dict[str, Any]
    ) -> OpenStream | Reply:
        """A 200 stream ready to relay, or the upstream's complete non-200 answer."""
        async def attempt(upstream: Upstream) -> OpenStream | Reply:
            upstream.num_outstanding += 1
            response: aiohttp.ClientResponse | None = None
            handed_over = False
            try:
                response = await self.client.open(upstream.url + path, body,
                                                  upstream.auth_headers)
                if response.status != 200:
                    return Reply(upstream, response.status, await response.read(),
                                 response.headers.get("content-type", "application/json"),
                                 response.headers.get("retry-after"))
                first = await response.content.readany()
                if not first:
                    raise UpstreamClosedEarly("stream ended before its first byte")
                handed_over = True
            finally:
                if not handed_over:  # every exit but success gives the slot back
                    upstream.num_outstanding -= 1
                    if response is not None:
                        response.close()
            upstream.record_success()
            return OpenStream(upstream, response, first)

        return await self._first_final(pool, policy, text, attempt)
