"""Drives a workload against a server: arrival times, a concurrency cap, warmup, a progress bar.

Arrivals: with a finite request rate R, the gaps between request sends are drawn from a gamma
distribution with shape `burstiness` and mean 1/R (burstiness 1 gives a Poisson process; lower is
burstier, higher is more regular). With R = inf every request is released at once and only
`max_concurrency` (when set) limits how many are in flight.

`peak_concurrency` counts requests actually in flight (sent, not finished), which can be lower than
the cap when arrivals are slow.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

from pagoda.bench.client import EndpointConfig, RequestRecord, send_request
from pagoda.bench.dataset import BenchRequest


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # requests per second; inf releases all at once
    burstiness: float = 1.0  # gamma shape of the inter-arrival gaps
    max_concurrency: int | None = None
    warmup: int = 0  # requests sent (one at a time) and discarded before timing starts
    seed: int = 0
    show_progress: bool = True
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive (or inf)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.warmup < 0:
            raise ValueError("--warmup must be non-negative")


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration_s: float
    peak_concurrency: int


def arrival_gaps(num_requests: int, config: LoadConfig) -> list[float]:
    """Seconds to wait before each request's send; the first request goes at once."""
    if math.isinf(config.request_rate):
        return [0.0] * num_requests
    rng = random.Random(config.seed)
    scale = 1.0 / (config.request_rate * config.burstiness)  # mean gap = shape * scale = 1/R
    gaps = [rng.gammavariate(config.burstiness, scale) for _ in range(num_requests)]
    gaps[0] = 0.0
    return gaps


class _InFlight:
    """Counts requests between send and finish and remembers the maximum."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


async def run_load(
    endpoint: EndpointConfig,
    requests: list[BenchRequest],
    load: LoadConfig,
    client: aiohttp.ClientSession | None = None,
) -> RunOutcome:
    """Send every request under the load pattern; returns records in request order."""
    own_client = client is None
    if client is None:
        # connecting and each read may take timeout_s, as httpx.Timeout(t) allowed: a stream as
        # a whole may last longer; proxies from the environment, as httpx honoured them
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=load.max_concurrency or max(1, len(requests))),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=load.timeout_s,
                                          sock_read=load.timeout_s),
            trust_env=True)
    try:
        for i in range(load.warmup):
            warm = requests[i % len(requests)]
            await send_request(client, endpoint, warm, -1, time.perf_counter())
        return await _timed_run(client, endpoint, requests, load)
    finally:
        if own_client:
            await client.close()


async def _timed_run(
    client: aiohttp.ClientSession,
    endpoint: EndpointConfig,
    requests: list[BenchRequest],
    load: LoadConfig,
) -> RunOutcome:
    gate = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    in_flight = _InFlight()
    progress = tqdm(total=len(requests), disable=not load.show_progress, unit="req")
    start = time.perf_counter()

    async def one(req_id: int, request: BenchRequest) -> RequestRecord:
        if gate is not None:
            await gate.acquire()
        in_flight.enter()
        try:
            return await send_request(client, endpoint, request, req_id, start)
        finally:
            in_flight.leave()
            if gate is not None:
                gate.release()
            progress.update(1)

    tasks = []
    gaps = arrival_gaps(len(requests), load)
    for req_id, (gap, request) in enumerate(zip(gaps, requests, strict=True)):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(req_id, request)))
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    progress.close()
    return RunOutcome(records, duration, in_flight.peak)
