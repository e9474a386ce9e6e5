"""Prefix-aware vs round-robin routing through the gateway, over two real `pagoda serve` replicas.

Prompts cycle through several distinct shared prefixes (system prompts). Prefix-aware routing sends
each prefix to one replica, so each prefix is prefilled once; round-robin spreads every prefix over
both replicas. Each policy runs against freshly started replicas (cold prefix caches); reported:
the bench summary and the replicas' `pagoda:prefix_cache_hits` counters.

    python benchmarks/gateway_prefix_routing.py [--num-prompts 64] [--num-prefixes 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import httpx
from local_servers import free_port, wait_healthy

PAGODA = [sys.executable, "-m", "pagoda.cli.main"]
KEY = "pk-bench-routing"


def prefix_hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r"^pagoda:prefix_cache_hits(?:_total)?(?:\{[^}]*\})?\s+([0-9.e+]+)$", text,
                  re.M)
    return float(m.group(1)) if m else 0.0


def run_policy(policy: str, args: argparse.Namespace, workdir: str) -> dict:
    ports = [free_port(), free_port()]
    replicas = [subprocess.Popen(PAGODA + ["serve", "--port", str(p), "--served-model-name",
                                           "smollm2", "--kv-cache-memory", str(512 << 20)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for p in ports]
    gw_port = free_port()
    key_hash = subprocess.run(PAGODA + ["gateway", "hash-key"], input=KEY, text=True,
                              capture_output=True, check=True).stdout.strip()
    config = os.path.join(workdir, f"gateway-{policy}.yaml")
    with open(config, "w") as f:
        f.write(f"host: 127.0.0.1\nport: {gw_port}\nkeys:\n  - name: bench\n"
                f"    hash: \"{key_hash}\"\n    models: [\"*\"]\n"
                f"models:\n  - name: smollm2\n    policy: {policy}\n    upstreams:\n"
                + "".join(f"      - http://127.0.0.1:{p}\n" for p in ports))
    gateway = subprocess.Popen(PAGODA + ["gateway", "--config", config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result_path = os.path.join(workdir, f"{policy}.json")
    try:
        for p in ports:
            wait_healthy(f"http://127.0.0.1:{p}")
        wait_healthy(f"http://127.0.0.1:{gw_port}", timeout=60)
        subprocess.run(PAGODA + [
            "bench", "serve", "--base-url", f"http://127.0.0.1:{gw_port}", "--api-key", KEY,
            "--model", "smollm2", "--dataset", "shared-prefix", "--num-prompts",
            str(args.num_prompts), "--input-len", str(args.input_len), "--shared-prefix-len",
            str(args.prefix_len), "--num-prefixes", str(args.num_prefixes), "--output-len",
            str(args.output_len), "--max-concurrency", str(args.concurrency), "--ignore-eos",
            "--disable-tqdm", "--save-result", result_path], check=True)
        hits = [prefix_hits(f"http://127.0.0.1:{p}") for p in ports]
    finally:
        for proc in [gateway, *replicas]:
            proc.terminate()
        for proc in [gateway, *replicas]:
            proc.wait(timeout=60)
    with open(result_path) as f:
        summary = json.load(f)["summary"]
    return {"policy": policy, "hits": hits, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-prefixes", type=int, default=8)
    p.add_argument("--input-len", type=int, default=384)
    p.add_argument("--prefix-len", type=int, default=320)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_policy(policy, args, workdir) for policy in ("prefix", "round_robin")]
    print(f"\n{args.num_prompts} prompts, {args.num_prefixes} prefixes x {args.prefix_len} tokens, "
          f"input {args.input_len}, output {args.output_len}, {args.concurrency} concurrent, "
          f"2 replicas")
    for r in results:
        s = r["summary"]
        print(f"  {r['policy']:<12} output tok/s {s['output_throughput']:7.1f}  TTFT p50 "
              f"{s['ttft_ms']['median']:8.0f} ms  p99 {s['ttft_ms']['p99']:8.0f} ms  "
              f"prefix-cache hit tokens per replica {[int(h) for h in r['hits']]}")


if __name__ == "__main__":
    main()
