"""Summary statistics of a run: throughputs, latency percentiles, goodput against SLOs.

Conventions: latencies are reported in milliseconds; only successful requests contribute to
latency statistics and token totals; every throughput divides by the whole benchmark duration.
Percentiles use linear interpolation between order statistics (numpy's default), so for any
sample min <= median <= p95 <= p99 <= max holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pagoda.bench.client import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class LatencyStats:
    """Distribution of one latency metric, in milliseconds; all zero for an empty sample."""

    count: int = 0
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    median: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    @classmethod
    def of_seconds(cls, values_s: list[float]) -> LatencyStats:
        if not values_s:
            return cls()
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(
            count=int(ms.size),
            mean=float(ms.mean()),
            std=float(ms.std()),
            min=float(ms.min()),
            median=float(p50),
            p95=float(p95),
            p99=float(p99),
            max=float(ms.max()),
        )


@dataclass(frozen=True)
class Summary:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    peak_concurrency: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slos_ms: dict[str, float] = field(default_factory=dict)
    good_requests: int | None = None  # requests meeting every SLO; None without SLOs
    goodput: float | None = None  # good requests / s
    errors: dict[str, int] = field(default_factory=dict)  # error text -> count

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        stats = {k: LatencyStats(**data[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}
        return cls(**{**data, **stats})


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0}; milliseconds."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad --goodput item {item!r}; use NAME:MS with NAME in {SLO_METRICS}")
        ms = float(value)
        if ms <= 0:
            raise ValueError(f"--goodput {name} must be positive")
        slos[name] = ms
    return slos


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A successful request whose measured metrics are all within their SLO. A request with a
    single output token has no TPOT and passes a TPOT SLO."""
    if not record.success:
        return False
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2e": record.e2e_s}
    for name, limit_ms in slos_ms.items():
        value = measured[name]
        if value is not None and value * 1000.0 > limit_ms:
            return False
    return True


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    peak_concurrency: int,
    slos_ms: dict[str, float] | None = None,
) -> Summary:
    assert duration_s > 0, "a run takes time"
    ok = [r for r in records if r.success]
    input_tokens = sum(r.server_prompt_tokens or r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(meets_slos(r, slos_ms) for r in records) if slos_ms else None
    return Summary(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        peak_concurrency=peak_concurrency,
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=LatencyStats.of_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in ok for gap in r.itl_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in ok if r.e2e_s is not None]),
        slos_ms=dict(slos_ms or {}),
        good_requests=good,
        goodput=None if good is None else good / duration_s,
        errors=dict(Counter(r.error for r in records if not r.success)),
    )
