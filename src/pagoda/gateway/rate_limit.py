"""Per-key limits: requests per minute, tokens per minute and concurrent requests.

All three use a sliding 60-second window of events (no fixed-window bursts at minute edges):
- a request is admitted only if, at admission, in-flight < max_concurrent, requests in the
  window < requests_per_minute and tokens in the window < tokens_per_minute; admission records the
  request and takes an in-flight lease atomically, so two admissions cannot both take the last slot;
- tokens are known only when the upstream reports `usage`, so they are recorded after the response.
  The token budget can therefore be overshot by the requests in flight when it ran out — with one
  request at a time, by at most one request's tokens.
- rejected requests are not recorded: they cost the caller nothing.

`MemoryRateLimiter` serves one gateway process; `RedisRateLimiter` (redis_state.py) shares state.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from pagoda.gateway.config import KeyConfig

WINDOW_S = 60.0
LEASE_S = 900.0  # an in-flight lease older than this is presumed leaked (crashed gateway)


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @classmethod
    def of(cls, key: KeyConfig) -> Limits:
        return cls(key.requests_per_minute, key.tokens_per_minute, key.max_concurrent)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one admission plus what the x-ratelimit-* headers report."""

    allowed: bool
    reason: str  # "" when allowed, else "concurrency" | "requests" | "tokens"
    limits: Limits
    num_requests: int  # requests in the window, including this one if allowed
    num_tokens: int  # tokens in the window
    reset_requests_s: float  # until the oldest request in the window expires
    reset_tokens_s: float  # until the window's tokens drop below the limit

    @property
    def retry_after_s(self) -> float:
        if self.reason == "requests":
            return self.reset_requests_s
        if self.reason == "tokens":
            return self.reset_tokens_s
        return 1.0  # concurrency: a slot frees when any in-flight request ends

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if rpm is not None:
            out["x-ratelimit-limit-requests"] = str(rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, rpm - self.num_requests))
            out["x-ratelimit-reset-requests"] = f"{self.reset_requests_s:.3f}s"
        if tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self.num_tokens))
            out["x-ratelimit-reset-tokens"] = f"{self.reset_tokens_s:.3f}s"
        if not self.allowed:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


def verdict(limits: Limits, num_inflight: int, num_requests: int, num_tokens: int) -> str:
    """Which limit (if any) refuses a new request; checked in this order by both backends."""
    if limits.max_concurrent is not None and num_inflight >= limits.max_concurrent:
        return "concurrency"
    if limits.requests_per_minute is not None and num_requests >= limits.requests_per_minute:
        return "requests"
    if limits.tokens_per_minute is not None and num_tokens >= limits.tokens_per_minute:
        return "tokens"
    return ""


class RateLimiter(ABC):
    """Admission control for API keys; `lease_id` is unique per request."""

    @abstractmethod
    async def acquire(self, key: str, limits: Limits, lease_id: str) -> Decision: ...

    @abstractmethod
    async def release(self, key: str, lease_id: str) -> None:
        """End an admitted request's in-flight lease; idempotent."""

    @abstractmethod
    async def record_tokens(self, key: str, lease_id: str, num_tokens: int) -> None: ...

    async def finish(self, key: str, lease_id: str, num_tokens: int) -> None:
        """`record_tokens` then `release`; backends may do both in one round trip."""
        await self.record_tokens(key, lease_id, num_tokens)
        await self.release(key, lease_id)

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class _KeyWindow:
    request_times: deque[float] = field(default_factory=deque)
    token_events: deque[tuple[float, int]] = field(default_factory=deque)
    num_tokens: int = 0  # == sum of token_events' counts
    inflight: dict[str, float] = field(default_factory=dict)  # lease id -> expiry

    def prune(self, now: float) -> None:
        while self.request_times and self.request_times[0] <= now - WINDOW_S:
            self.request_times.popleft()
        while self.token_events and self.token_events[0][0] <= now - WINDOW_S:
            self.num_tokens -= self.token_events.popleft()[1]
        for lease_id in [k for k, expiry in self.inflight.items() if expiry <= now]:
            del self.inflight[lease_id]

    def token_reset(self, now: float, limit: int | None) -> float:
        if limit is None or self.num_tokens < limit:
            return 0.0
        left = self.num_tokens
        for ts, n in self.token_events:
            left -= n
            if left < limit:
                return ts + WINDOW_S - now
        return WINDOW_S


class MemoryRateLimiter(RateLimiter):
    """Single-process backend; every method runs without awaiting, so each is atomic on the loop."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _KeyWindow] = {}

    async def acquire(self, key: str, limits: Limits, lease_id: str) -> Decision:
        now = self._clock()
        w = self._windows.setdefault(key, _KeyWindow())
        w.prune(now)
        reason = verdict(limits, len(w.inflight), len(w.request_times), w.num_tokens)
        if not reason:
            w.request_times.append(now)
            w.inflight[lease_id] = now + LEASE_S
        reset_requests = w.request_times[0] + WINDOW_S - now if w.request_times else 0.0
        return Decision(
            allowed=not reason,
            reason=reason,
            limits=limits,
            num_requests=len(w.request_times),
            num_tokens=w.num_tokens,
            reset_requests_s=reset_requests,
            reset_tokens_s=w.token_reset(now, limits.tokens_per_minute),
        )

    async def release(self, key: str, lease_id: str) -> None:
        w = self._windows.get(key)
        if w is not None:
            w.inflight.pop(lease_id, None)

    async def record_tokens(self, key: str, lease_id: str, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        w = self._windows.setdefault(key, _KeyWindow())
        w.token_events.append((self._clock(), num_tokens))
        w.num_tokens += num_tokens
