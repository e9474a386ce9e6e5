"""Everything one gateway app owns: config, keys, limits, caches, pools, HTTP client, metrics.

Built once per app by `GatewayState.build`; `start()` and `close()` bracket the app's lifetime
(the health checker runs in between). Nothing here is module-global, so tests and benchmarks can
run several gateways in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from pagoda.gateway.auth import KeyStore
from pagoda.gateway.config import GatewayConfig, PoolConfig
from pagoda.gateway.embedding_cache import EmbeddingCache, MemoryEmbeddingCache
from pagoda.gateway.health import HealthChecker
from pagoda.gateway.metrics import GatewayMetrics
from pagoda.gateway.proxy import Forwarder
from pagoda.gateway.rate_limit import MemoryRateLimiter, RateLimiter
from pagoda.gateway.redis_state import (
    RedisEmbeddingCache,
    RedisRateLimiter,
    RedisResponseCache,
)
from pagoda.gateway.response_cache import MemoryResponseCache, ResponseCache
from pagoda.gateway.router import Policy, make_policy
from pagoda.gateway.upstream import UpstreamPool
from pagoda.gateway.upstream_client import UpstreamClient


@dataclass(slots=True)
class GatewayState:
    config: GatewayConfig
    keys: KeyStore
    limiter: RateLimiter
    cache: ResponseCache | None
    embedding_cache: EmbeddingCache | None
    pools: dict[str, UpstreamPool]
    policies: dict[str, Policy]
    client: UpstreamClient
    forwarder: Forwarder
    metrics: GatewayMetrics
    health: HealthChecker
    redis: Redis | None

    @classmethod
    def build(cls, config: GatewayConfig, redis_url: str | None = None) -> GatewayState:
        """`redis_url` overrides the config's; empty means in-memory state."""
        redis_url = config.redis_url if redis_url is None else redis_url
        metrics = GatewayMetrics()
        client = UpstreamClient(config.retry)
        pools = {p.name: UpstreamPool(p, config.health) for p in config.models}
        policies = {p.name: make_policy(p) for p in config.models}
        redis = Redis.from_url(redis_url) if redis_url else None
        limiter: RateLimiter
        cache: ResponseCache | None = None
        embedding_cache: EmbeddingCache | None = None
        if redis is not None:
            limiter = RedisRateLimiter(redis, config.redis_prefix)
            if config.cache.enabled:
                cache = RedisResponseCache(redis, config.redis_prefix, config.cache.ttl_s)
            if config.embedding_cache.enabled:
                embedding_cache = RedisEmbeddingCache(redis, config.redis_prefix)
        else:
            limiter = MemoryRateLimiter()
            if config.cache.enabled:
                cache = MemoryResponseCache(config.cache.ttl_s, config.cache.max_entries)
            if config.embedding_cache.enabled:
                embedding_cache = MemoryEmbeddingCache(config.embedding_cache.max_bytes)
        return cls(
            config=config,
            keys=KeyStore(config.keys),
            limiter=limiter,
            cache=cache,
            embedding_cache=embedding_cache,
            pools=pools,
            policies=policies,
            client=client,
            forwarder=Forwarder(client, config.retry, metrics),
            metrics=metrics,
            health=HealthChecker(list(pools.values()), config.health, client, metrics),
            redis=redis,
        )

    def public_models(self) -> list[str]:
        return [p.name for p in self.config.models] + [v.name for v in self.config.virtual_models]

    def pool_config(self, name: str) -> PoolConfig | None:
        pool = self.pools.get(name)
        return pool.config if pool is not None else None

    async def start(self) -> None:
        if self.redis is not None:
            await self.redis.ping()  # fail fast on a wrong --redis URL
        self.health.start()

    async def close(self) -> None:
        await self.health.stop()
        await self.client.close()
        if self.redis is not None:
            await self.redis.aclose()
