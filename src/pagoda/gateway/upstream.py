"""Upstream replicas and the pool that serves one public model name.

An upstream is *available* when its last active health checks passed and it is not passively
ejected. Passive ejection follows `eject_after_failures` consecutive failed requests and lasts
`eject_s`; afterwards the upstream is tried again (a failure re-ejects it only after another run of
failures). If no upstream of a pool is available, every one is a candidate again ("panic mode"):
a gateway that refuses all traffic because its checks are wrong is worse than one that tries.

All mutation happens on the event loop; there are no locks because nothing here awaits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pagoda.gateway.config import HealthConfig, PoolConfig, UpstreamConfig


@dataclass(slots=True)
class Upstream:
    config: UpstreamConfig
    healthy: bool = True  # verdict of the active checks
    num_failed_checks: int = 0  # consecutive
    num_failed_requests: int = 0  # consecutive
    ejected_until: float = 0.0
    num_outstanding: int = 0  # requests sent and not yet finished (streams count until closed)
    num_requests: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def auth_headers(self) -> dict[str, str]:
        return self.config.auth_headers

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def record_success(self) -> None:
        self.num_failed_requests = 0

    def record_failure(self, now: float, health: HealthConfig) -> bool:
        """Count a failed request; returns True if this failure ejected the upstream."""
        self.num_failed_requests += 1
        if self.num_failed_requests >= health.eject_after_failures:
            self.num_failed_requests = 0
            self.ejected_until = now + health.eject_s
            return True
        return False

    def record_check(self, ok: bool, health: HealthConfig) -> None:
        if ok:
            self.num_failed_checks = 0
            self.healthy = True
        else:
            self.num_failed_checks += 1
            if self.num_failed_checks >= health.unhealthy_after:
                self.healthy = False


class UpstreamPool:
    def __init__(
        self, config: PoolConfig, health: HealthConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.health = health
        self.clock = clock
        self.upstreams = [Upstream(u) for u in config.upstreams]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def upstream_model(self) -> str:
        return self.config.upstream_model or self.config.name

    def candidates(self, exclude: set[str] = frozenset()) -> list[Upstream]:
        """Upstreams a request may go to next, in config order; never one in `exclude`."""
        now = self.clock()
        fresh = [u for u in self.upstreams if u.name not in exclude]
        available = [u for u in fresh if u.available(now)]
        return available or fresh

    def record_failure(self, upstream: Upstream) -> bool:
        return upstream.record_failure(self.clock(), self.health)
