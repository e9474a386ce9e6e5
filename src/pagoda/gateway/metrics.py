"""Prometheus metrics of one gateway app, in a registry of its own (no process-global state, so
several apps in one process — as in the tests — never share or clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pagoda:gateway_requests", "Requests answered, by key, model, upstream and status.",
            ["key", "model", "upstream", "status"], registry=r,
        )
        self.latency = Histogram(
            "pagoda:gateway_request_latency_seconds",
            "Time from request arrival to the last byte of the answer.",
            ["key", "model", "upstream"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "pagoda:gateway_tokens", "Tokens in upstream usage, by kind (prompt|completion).",
            ["key", "model", "upstream", "kind"], registry=r,
        )
        self.rate_limited = Counter(
            "pagoda:gateway_rate_limited", "Requests rejected with 429, by limit.",
            ["key", "limit"], registry=r,
        )
        self.cache = Counter(
            "pagoda:gateway_cache_lookups", "Response-cache lookups by result (hit|miss).",
            ["model", "result"], registry=r,
        )
        # per input, not per request: a request of 10 inputs with 7 cached adds 7 and 3
        self.embedding_cache_hits = Counter(
            "pagoda:gateway_embedding_cache_hits", "Embedding inputs answered from the cache.",
            ["model"], registry=r,
        )
        self.embedding_cache_misses = Counter(
            "pagoda:gateway_embedding_cache_misses",
            "Embedding inputs looked up and not found (computed upstream).", ["model"], registry=r,
        )
        self.retries = Counter(
            "pagoda:gateway_retries", "Attempts that failed before any byte reached the client.",
            ["model", "upstream"], registry=r,
        )
        self.upstream_healthy = Gauge(
            "pagoda:gateway_upstream_healthy", "1 if the upstream is available for new requests.",
            ["model", "upstream"], registry=r,
        )
        self.upstream_outstanding = Gauge(
            "pagoda:gateway_upstream_outstanding", "Requests in flight to the upstream.",
            ["model", "upstream"], registry=r,
        )

    def record_usage(self, key: str, model: str, upstream: str, usage: dict | None) -> int:
        """Count a response's usage; returns prompt + completion tokens (0 without usage)."""
        if not isinstance(usage, dict):
            return 0
        total = 0
        for kind, alias in (("prompt", "input_tokens"), ("completion", "output_tokens")):
            value = usage.get(f"{kind}_tokens", usage.get(alias))  # OpenAI's or Anthropic's
            if isinstance(value, int) and value > 0:
                self.tokens.labels(key, model, upstream, kind).inc(value)
                total += value
        return total

    def render(self) -> bytes:
        return generate_latest(self.registry)
