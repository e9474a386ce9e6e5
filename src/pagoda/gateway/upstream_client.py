"""The gateway's HTTP client to upstreams: one keep-alive aiohttp session per gateway app.

Why aiohttp and not httpx: on this forwarding hot path httpx's connection pool costs more CPU per
request than everything else the gateway does (it rescans and polls every pooled connection on each
request); a bare FastAPI proxy measured ~340 req/s through httpx and ~2,600 req/s through aiohttp on
the same 2-core machine (see docs/benchmarks.md, "Gateway"). Tests and benchmarks still use httpx as
the *client* of the gateway.

`UPSTREAM_ERRORS` is what a failed attempt raises: connection errors, protocol errors, a response
cut short, and timeouts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from pagoda.gateway.config import RetryConfig
from pagoda.telemetry import inject_context

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
_JSON = {"content-type": "application/json"}


class UpstreamClient:
    def __init__(self, retry: RetryConfig) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=retry.connect_timeout_s, sock_read=retry.read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running event loop (aiohttp requires one)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False,
                auto_decompress=True,
            )
        return self._session

    async def post_json(self, url: str, body: dict[str, Any],
                        headers: Mapping[str, str] | None = None
                        ) -> tuple[int, str, bytes, str | None]:
        """POST and read the whole answer: (status, content type, body bytes, Retry-After)."""
        # the current span's traceparent goes along, so the upstream's spans join this trace
        sent = inject_context({**_JSON, **(headers or {})})
        async with self.session.post(url, data=json.dumps(body), headers=sent) as response:
            content = await response.read()
            return (response.status, response.headers.get("content-type", ""), content,
                    response.headers.get("retry-after"))

    async def open(self, url: str, body: dict[str, Any],
                   headers: Mapping[str, str] | None = None) -> aiohttp.ClientResponse:
        """POST and return once the status and headers are in; the caller must close it."""
        return await self.session.post(url, data=json.dumps(body),
                                       headers=inject_context({**_JSON, **(headers or {})}))

    async def probe(self, url: str, timeout_s: float,
                    headers: Mapping[str, str] | None = None) -> bool:
        """GET `url`; True on a 2xx within `timeout_s`."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session.get(url, timeout=timeout, headers=headers) as response:
                await response.read()
                return 200 <= response.status < 300
        except UPSTREAM_ERRORS:
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
