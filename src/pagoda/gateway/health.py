"""Active health checks: every `interval_s`, GET `<upstream><path>` for each upstream of each pool.

A check passes on any 2xx within `timeout_s`. `unhealthy_after` consecutive failures take the
upstream out of rotation; one pass brings it back. Checks of one round run concurrently, so a hung
upstream delays the round by at most `timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pagoda.gateway.config import HealthConfig
from pagoda.gateway.metrics import GatewayMetrics
from pagoda.gateway.upstream import Upstream, UpstreamPool
from pagoda.gateway.upstream_client import UpstreamClient

logger = logging.getLogger(__name__)


class HealthChecker:
    def __init__(
        self,
        pools: list[UpstreamPool],
        config: HealthConfig,
        client: UpstreamClient,
        metrics: GatewayMetrics,
    ) -> None:
        self.pools = pools
        self.config = config
        self.client = client
        self.metrics = metrics
        self._task: asyncio.Task | None = None

    async def _probe(self, upstream: Upstream) -> bool:
        return await self.client.probe(upstream.url + self.config.path, self.config.timeout_s,
                                       upstream.auth_headers)

    async def check_once(self) -> None:
        upstreams = [u for pool in self.pools for u in pool.upstreams]
        results = await asyncio.gather(*(self._probe(u) for u in upstreams))
        for upstream, ok in zip(upstreams, results, strict=True):
            was_healthy = upstream.healthy
            upstream.record_check(ok, self.config)
            if upstream.healthy != was_healthy:
                verdict = "healthy again" if upstream.healthy else "unhealthy, out of rotation"
                logger.warning("upstream %s is %s", upstream.name, verdict)
        self.publish()

    def publish(self) -> None:
        """Refresh the health and load gauges from the upstreams' current state."""
        for pool in self.pools:
            now = pool.clock()
            for u in pool.upstreams:
                self.metrics.upstream_healthy.labels(pool.name, u.name).set(int(u.available(now)))
                self.metrics.upstream_outstanding.labels(pool.name, u.name).set(u.num_outstanding)

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.config.interval_s)

    def start(self) -> None:
        assert self._task is None, "health checker already started"
        self._task = asyncio.create_task(self._run(), name="pagoda-gateway-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
