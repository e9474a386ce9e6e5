"""One Ray Serve replica against two on the same cores (issue 16's scale-out benchmark).

Each configuration is started, measured with `pagoda bench serve` (streaming completions, a
fixed concurrency) and stopped before the next one starts: `pagoda serve` without Ray (the
baseline: what Ray's proxy and router add), `pagoda ray-serve --num-replicas 1` with all the
threads, and `--num-replicas N` with the threads split between the replicas. Prints one table
with each figure's ratio to the one-replica Ray run of the same invocation, and the CPU.

    python benchmarks/ray_replicas.py [--replicas 2] [--threads 2] [--num-prompts 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from parallel import cpu_model  # noqa: E402 - the sibling benchmark's helper

PAGODA = Path(sys.executable).parent / "pagoda"
PORT = 8391


@contextlib.contextmanager
def server(command: list[str]) -> Iterator[str]:
    url = f"http://127.0.0.1:{PORT}"
    proc = subprocess.Popen([str(PAGODA), *command, "--port", str(PORT),
                             "--served-model-name", "m", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} not ready in 300 s")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(url: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(PAGODA), "bench", "serve", "--base-url", url, "--model", "m",
                        "--num-prompts", str(args.num_prompts), "--input-len",
                        str(args.input_len), "--output-len", str(args.output_len),
                        "--max-concurrency", str(args.concurrency), "--ignore-eos",
                        "--warmup", "4", "--disable-tqdm", "--save-result", out.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads(Path(out.name).read_text())["summary"]
    return {"throughput": summary["output_throughput"],
            "ttft": summary["ttft_ms"]["median"], "tpot": summary["tpot_ms"]["median"],
            "failed": summary["failed"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads in total, split between "
                   "the replicas")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    args = p.parse_args()
    each = max(1, args.threads // args.replicas)
    engine = ["--kv-cache-memory", str(256 << 20)]
    ray = ["ray-serve", "--ray-num-cpus", str(args.threads), *engine]
    runs = [
        ("pagoda serve (no Ray)", ["serve", "--threads", str(args.threads), *engine]),
        ("ray-serve, 1 replica", [*ray, "--num-replicas", "1", "--threads", str(args.threads)]),
        (f"ray-serve, {args.replicas} replicas",
         [*ray, "--num-replicas", str(args.replicas), "--threads", str(each)]),
    ]
    print(f"CPU: {cpu_model()}; {args.threads} threads in total; {args.num_prompts} requests x "
          f"({args.input_len} in, {args.output_len} out), {args.concurrency} concurrent, "
          "streaming")
    print(f"{'configuration':28} {'out tok/s':>10} {'ratio':>6} {'TTFT p50 ms':>12} "
          f"{'TPOT p50 ms':>12} {'failed':>7}")
    results = {}
    for name, command in runs:
        with server(command) as url:
            results[name] = measure(url, args)
    base = results["ray-serve, 1 replica"]["throughput"]
    for name, r in results.items():
        print(f"{name:28} {r['throughput']:>10.1f} {r['throughput'] / base:>5.2f}x "
              f"{r['ttft']:>12.0f} {r['tpot']:>12.1f} {r['failed']:>7}", flush=True)


if __name__ == "__main__":
    main()
