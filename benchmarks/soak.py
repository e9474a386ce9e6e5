"""Soak: many mixed requests against a real `pagoda serve`, then the books must balance.

    python benchmarks/soak.py                      # 1,000 requests, 64 concurrent
    python benchmarks/soak.py --requests 200       # shorter

The mix: prompts of 1-400 words, max_tokens 1-96, streaming or not, n of 1-3, stop strings,
chat and completions, and 10% of clients that disconnect mid-request. Pass/fail (exit status):
0 errors (every finished request is a 200, every refused one a documented 4xx/503), every KV
block free again afterwards (`/debug/kv`), and the RSS of the server and its engine process flat
within 5% between the second and the last minute (sampled each second). Progress is printed as
it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

import aiohttp
from local_servers import free_port, wait_healthy

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches in distant valleys of amber light").split()


def rss_bytes(pid: int) -> int:
    """RSS of the server and its children (the engine process, by default), summed."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:  # a child that just exited
            pass
    return total


def request_body(rng: random.Random) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 400)))
    body = {"max_tokens": rng.randint(1, 96), "temperature": rng.choice([0, 0.7, 1.0]),
            "n": rng.choice([1, 1, 1, 2, 3]), "stream": rng.random() < 0.5,
            "stop": rng.choice([None, ["."], ["fox", "\n\n"]])}
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


async def one(session: aiohttp.ClientSession, url: str, rng: random.Random,
              stats: dict[str, int]) -> None:
    path, body = request_body(rng)
    disconnect = rng.random() < 0.10
    try:
        async with session.post(url + path, json=body) as r:
            if disconnect:  # leave after the first bytes (or at once)
                await r.content.read(64)
                stats["disconnected"] += 1
                return
            payload = await r.read()
            if r.status == 200:
                if body["stream"] and not payload.rstrip().endswith(b"data: [DONE]"):
                    stats["errors"] += 1
                    print("stream without [DONE]", payload[-200:], flush=True)
                else:
                    stats["ok"] += 1
            elif r.status in (400, 503):  # context too long, overloaded: documented refusals
                stats[f"refused_{r.status}"] += 1
            else:
                stats["errors"] += 1
                print("unexpected", r.status, payload[:300], flush=True)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        stats["errors"] += 1
        print("client error", type(exc).__name__, exc, flush=True)


async def run(url: str, num: int, concurrency: int, seed: int, pid: int) -> dict:
    rng = random.Random(seed)
    stats = {k: 0 for k in ("ok", "disconnected", "errors", "refused_400", "refused_503")}
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            rss.append((time.monotonic() - start, rss_bytes(pid)))
            await asyncio.sleep(1)

    sampler = asyncio.create_task(sample())
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def gated(i: int) -> None:
            async with gate:
                await one(s, url, random.Random(rng.random()), stats)
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{num} requests, {time.monotonic() - start:.0f} s, {stats}",
                      flush=True)

        await asyncio.gather(*(gated(i) for i in range(num)))
    done.set()
    await sampler
    return {"stats": stats, "seconds": time.monotonic() - start, "rss": rss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pagoda = os.path.join(os.path.dirname(sys.executable), "pagoda")
    server = subprocess.Popen([pagoda, "serve", "--port", str(port), "--log-level", "warning",
                               "--kv-cache-memory", "256MiB", "--max-waiting", "256"])
    try:
        wait_healthy(url, server)
        result = asyncio.run(run(url, args.requests, args.concurrency, args.seed, server.pid))
        time.sleep(2)  # aborted requests are released at the engine's next iteration
        kv = json.loads(subprocess.run(["curl", "-s", url + "/debug/kv"], capture_output=True,
                                       text=True).stdout)
    finally:
        server.terminate()
        server.wait()
    stats, rss = result["stats"], result["rss"]
    leaked = kv["num_total_blocks"] - kv["num_free_blocks"]
    second = [b for t, b in rss if 60 <= t < 120] or [b for _, b in rss[: len(rss) // 2]]
    last = [b for t, b in rss if t >= rss[-1][0] - 60] or [b for _, b in rss[len(rss) // 2:]]
    drift = statistics.median(last) / statistics.median(second) - 1
    # the curve, so a plateau can be told from a steady climb
    by_minute = [round(statistics.median(b for t, b in rss if m * 60 <= t < (m + 1) * 60) / 2**20)
                 for m in range(int(rss[-1][0] // 60) + 1)
                 if any(m * 60 <= t < (m + 1) * 60 for t, _ in rss)]
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency,
                      "seconds": round(result["seconds"], 1), **stats,
                      "leaked_blocks": leaked, "running_after": kv["num_running"],
                      "rss_mib_second_minute": round(statistics.median(second) / 2**20),
                      "rss_mib_last_minute": round(statistics.median(last) / 2**20),
                      "rss_drift": round(drift, 4), "rss_mib_by_minute": by_minute}, indent=1))
    ok = stats["errors"] == 0 and leaked == 0 and abs(drift) <= 0.05
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
