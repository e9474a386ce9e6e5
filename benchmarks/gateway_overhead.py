"""Gateway overhead: added latency per request and throughput ceiling, against a same-run baseline.

Starts one fake upstream (tests/gateway/fake_upstream.py, answers at once) and one
`pagoda gateway` process in front of it, then measures with the same client:

1. latency: sequential requests, alternating direct-to-upstream and through-gateway, so both see the
   same machine load; p50/p99 of each and of the difference (non-streaming and streaming);
2. throughput: a fixed number of concurrent clients for a fixed time, direct and through the
   gateway; requests per second completed.

The gateway runs with an API key (auth memoised after the first request), an RPM/TPM limit high
enough never to trigger, and the response cache bypassed (temperature 1), so every request takes
the full path: auth, limits, routing, forwarding, usage accounting.

With `--state redis` the gateway keeps its limits (and cache) in a throwaway `redis-server`, so
each request also pays the admission Lua script and the token-recording script.

Usage: python benchmarks/gateway_overhead.py [--requests 1000] [--duration 10] [--concurrency 32]
       [--state memory|redis] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from local_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "gateway" / "fake_upstream.py"
KEY = "pk-bench-key"


def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def start_processes(tmp: Path, state: str) -> tuple[list[subprocess.Popen], str, str]:
    from pagoda.gateway.auth import hash_key

    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", str(up_port), "--name", "bench"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    procs = [upstream]
    redis_args: list[str] = []
    if state == "redis":
        redis_port = free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        procs.append(subprocess.Popen(
            [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        redis_args = ["--redis", f"redis://127.0.0.1:{redis_port}/0"]
        time.sleep(0.5)
    config = {
        "keys": [{"name": "bench", "hash": hash_key(KEY), "requests_per_minute": 10_000_000,
                  "tokens_per_minute": 1_000_000_000}],
        "models": [{"name": "m", "upstreams": [f"http://127.0.0.1:{up_port}"]}],
        "health": {"interval_s": 5},
    }
    path = tmp / "gateway.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    pagoda = Path(sys.executable).with_name("pagoda")
    gateway = subprocess.Popen(
        [str(pagoda), "gateway", "--config", str(path), "--port", str(gw_port),
         "--log-level", "warning", *redis_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    direct, via = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    wait_up(direct + "/health")
    wait_up(via + "/health")
    return [*procs, gateway], direct, via


BODY = {"model": "m", "prompt": "the quick brown fox", "max_tokens": 8}
HEADERS = {"Authorization": f"Bearer {KEY}"}


def one_request(client: httpx.Client, base: str, stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        with client.stream("POST", base + "/v1/completions", json={**BODY, "stream": True},
                           headers=HEADERS) as r:
            for _ in r.iter_bytes():
                pass
            assert r.status_code == 200
    else:
        r = client.post(base + "/v1/completions", json=BODY, headers=HEADERS)
        assert r.status_code == 200, r.text
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(direct: str, via: str, n: int, stream: bool) -> dict[str, float]:
    with httpx.Client(timeout=10) as client:
        for _ in range(50):  # warm up connections, auth memo, code paths
            one_request(client, direct, stream)
            one_request(client, via, stream)
        d, g = [], []
        for _ in range(n):
            d.append(one_request(client, direct, stream))
            g.append(one_request(client, via, stream))
    ms = 1000.0
    return {
        "direct_p50_ms": percentile(d, 0.5) * ms, "direct_p99_ms": percentile(d, 0.99) * ms,
        "gateway_p50_ms": percentile(g, 0.5) * ms, "gateway_p99_ms": percentile(g, 0.99) * ms,
        "added_p50_ms": (percentile(g, 0.5) - percentile(d, 0.5)) * ms,
        "added_p99_ms": (percentile(g, 0.99) - percentile(d, 0.99)) * ms,
        "added_mean_ms": (statistics.fmean(g) - statistics.fmean(d)) * ms,
    }


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        elif line.startswith(b"transfer-encoding:") and b"chunked" in line:
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def throughput(base: str, concurrency: int, duration: float) -> dict[str, float]:
    """Closed-loop load from `concurrency` keep-alive connections. The client is a minimal raw
    HTTP/1.1 writer/reader rather than httpx, so that the load generator, which shares the two
    cores with the gateway and the upstream, costs as little CPU as possible."""
    host, port = base.split("://")[1].split(":")
    payload = json.dumps(BODY).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    done = errors = 0
    stop = time.monotonic() + duration

    async def worker() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.monotonic() < stop:
                writer.write(request)
                if await _read_response(reader) == 200:
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"requests_per_s": done / elapsed, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per side")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--state", choices=["memory", "redis"], default="memory",
                        help="gateway state backend for limits and cache")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs, direct, via = start_processes(Path(tmp), args.state)
        try:
            result = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "cpus": os.cpu_count(),
                "load_average_before": os.getloadavg()[0],
                "latency_json": latency(direct, via, args.requests, stream=False),
                "latency_sse": latency(direct, via, args.requests // 2, stream=True),
                "throughput_direct": asyncio.run(
                    throughput(direct, args.concurrency, args.duration)),
                "throughput_gateway": asyncio.run(
                    throughput(via, args.concurrency, args.duration)),
                "settings": vars(args) | {"json_out": str(args.json_out)},
            }
            result["load_average_after"] = os.getloadavg()[0]
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=10)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
