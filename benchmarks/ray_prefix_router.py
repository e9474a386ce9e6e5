"""Ray Serve's two routers on a prefix-heavy load: `--ray-router pow2` against `prefix`.

Two replicas, each with a KV cache too small for every prefix of the workload but large enough
for half of them: Ray's power-of-two choice sends each prefix to both replicas, whose caches
then evict each other's prefixes, while the prefix router keeps each prefix on one replica.
Each router's app is started, measured with `pagoda bench serve` (shared-prefix dataset,
streaming completions) and stopped before the next. The prefix-cache hit rate is summed over
both replicas from their /metrics (read through the app until both replicas have answered).

    python benchmarks/ray_prefix_router.py [--num-prefixes 8] [--prefix-len 384]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from ray_replicas import PAGODA, cpu_model, server  # noqa: E402 - the sibling's helpers

METRIC = re.compile(r"^pagoda:prefix_cache_(queries|hits)_total(?:\{[^}]*\})? ([0-9.e+]+)$")


def prefix_counters(url: str) -> dict[str, float]:
    """queries and hits summed over the replicas (each read once, by its x-pagoda-replica)."""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        r = httpx.get(url + "/metrics", timeout=10)
        counts: dict[str, float] = {}
        for line in r.text.splitlines():
            if m := METRIC.match(line):
                counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
        seen[r.headers["x-pagoda-replica"]] = counts
    return {k: sum(c.get(k, 0.0) for c in seen.values()) for k in ("queries", "hits")}


def measure(url: str, args: argparse.Namespace) -> dict:
    before = prefix_counters(url)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(PAGODA), "bench", "serve", "--base-url", url, "--model", "m",
                        "--dataset", "shared-prefix", "--num-prefixes", str(args.num_prefixes),
                        "--shared-prefix-len", str(args.prefix_len), "--input-len",
                        str(args.prefix_len + args.suffix_len), "--output-len",
                        str(args.output_len), "--num-prompts", str(args.num_prompts),
                        "--max-concurrency", str(args.concurrency), "--ignore-eos",
                        "--disable-tqdm", "--save-result", out.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads(Path(out.name).read_text())["summary"]
    after = prefix_counters(url)
    queries = after["queries"] - before["queries"]
    return {"throughput": summary["output_throughput"], "ttft": summary["ttft_ms"]["median"],
            "ttft_p99": summary["ttft_ms"]["p99"], "failed": summary["failed"],
            "hit_rate": (after["hits"] - before["hits"]) / queries if queries else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=384)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kv-cache-memory", default=str(128 << 20),
                   help="per replica (default: 2,912 tokens of SmolLM2 in fp32)")
    args = p.parse_args()
    common = ["ray-serve", "--ray-num-cpus", "2", "--num-replicas", "2", "--threads", "1",
              "--kv-cache-memory", args.kv_cache_memory]
    print(f"CPU: {cpu_model()}; 2 replicas x 1 thread; {args.num_prompts} requests x "
          f"({args.prefix_len} shared of {args.num_prefixes} prefixes + {args.suffix_len} own "
          f"in, {args.output_len} out), {args.concurrency} concurrent, streaming")
    print(f"{'router':8} {'out tok/s':>10} {'ratio':>6} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'prefix hits':>12} {'failed':>7}")
    results = {}
    for router in ("pow2", "prefix"):
        with server([*common, "--ray-router", router]) as url:
            results[router] = measure(url, args)
    base = results["pow2"]["throughput"]
    for router, r in results.items():
        print(f"{router:8} {r['throughput']:>10.1f} {r['throughput'] / base:>5.2f}x "
              f"{r['ttft']:>12.0f} {r['ttft_p99']:>12.0f} {r['hit_rate']:>11.0%} "
              f"{r['failed']:>7}", flush=True)


if __name__ == "__main__":
    main()
