"""Engine thread vs engine process: the same `pagoda serve` workload in both modes, alternating.

Each run starts a fresh `pagoda serve` (default model, fp32, `--kv-cache-memory 512MiB`), in
thread mode or with `--engine-process`, and drives it with `pagoda bench serve`: by default 64
streaming `/v1/completions` requests, at most 32 in flight, 128 random prompt tokens and 128
output tokens each (`--ignore-eos`, greedy), the same prompts (seed 0) in every run. Modes
alternate, and the order flips each round (thread, process, process, thread, ...) so a drift in
the machine's load does not favour one mode. Reported per run and as the mean per mode: output
tok/s, TTFT p50/p99 and ITL p50/p99 (client side, from the bench's JSON), and the process/thread
ratio of the means. To tell a mode's cost from a busy machine, each run also records the CPU
seconds of the server's process tree and of the bench client, the CPU seconds everything else on
the machine used meanwhile ("foreign", from /proc/stat), the 1-minute load average as the timed
part starts (after the model load, so it includes this script's own previous run), and
the resident memory of the server process and of its engine child.

    python benchmarks/engine_process.py [--rounds 2] [--num-prompts 64] [--concurrency 32]
        [--input-len 128] [--output-len 128] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile

import psutil
from local_servers import free_port, wait_healthy

PAGODA = [sys.executable, "-m", "pagoda.cli.main"]
KV_CACHE_MEMORY = str(512 << 20)  # 32 requests x 256 tokens in fp32 fit without preemption
MODES = {"thread": [], "process": ["--engine-process"]}


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU time (all cores) from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def run_once(mode: str, args: argparse.Namespace, workdir: str, index: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen(PAGODA + ["serve", "--port", str(port), "--kv-cache-memory",
                                        KV_CACHE_MEMORY, "--log-level", "warning", *MODES[mode]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    result_path = os.path.join(workdir, f"{index}-{mode}.json")
    try:
        wait_healthy(url, server)
        load = os.getloadavg()[0]
        server_cpu0, busy0 = tree_cpu_seconds(server.pid), busy_cpu_seconds()
        client_cpu0 = _children_cpu_seconds()
        subprocess.run(PAGODA + [
            "bench", "serve", "--base-url", url, "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.concurrency), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--ignore-eos", "--warmup", "2",
            "--disable-tqdm", "--save-result", result_path], check=True, env=env,
            stdout=subprocess.DEVNULL)
        client_cpu = _children_cpu_seconds() - client_cpu0  # servers are not reaped yet
        server_cpu = tree_cpu_seconds(server.pid) - server_cpu0
        foreign_cpu = busy_cpu_seconds() - busy0 - server_cpu - client_cpu
        children = psutil.Process(server.pid).children(recursive=True)
        engine = [c for c in children if "multiprocessing.spawn" in " ".join(c.cmdline())]
        rss_mb = (psutil.Process(server.pid).memory_info().rss / 2**20,
                  engine[0].memory_info().rss / 2**20 if engine else 0.0)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    with open(result_path) as f:
        s = json.load(f)["summary"]
    row = {"mode": mode, "load_avg_1m": load, "output_tok_s": s["output_throughput"],
           "ttft_p50_ms": s["ttft_ms"]["median"], "ttft_p99_ms": s["ttft_ms"]["p99"],
           "itl_p50_ms": s["itl_ms"]["median"], "itl_p99_ms": s["itl_ms"]["p99"],
           "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "foreign_cpu_s": foreign_cpu,
           "server_rss_mb": rss_mb[0], "engine_rss_mb": rss_mb[1],
           "completed": s["completed"], "failed": s["failed"]}
    print(format_row(row), flush=True)
    return row


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


FIELDS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
          "server_cpu_s")  # compared as process / thread
CONTEXT = ("load_avg_1m", "foreign_cpu_s", "server_rss_mb", "engine_rss_mb")


def format_row(row: dict) -> str:
    return (f"  {row['mode']:<8} {row['output_tok_s']:7.1f} tok/s  TTFT p50 "
            f"{row['ttft_p50_ms']:7.0f} p99 {row['ttft_p99_ms']:7.0f} ms  ITL p50 "
            f"{row['itl_p50_ms']:5.0f} p99 {row['itl_p99_ms']:5.0f} ms  "
            f"load {row['load_avg_1m']:.2f}  CPU s server {row['server_cpu_s']:.0f} foreign "
            f"{row['foreign_cpu_s']:.0f}  RSS MB server {row['server_rss_mb']:.0f} engine "
            f"{row['engine_rss_mb']:.0f}"
            + (f"  FAILED {row['failed']}" if row.get("failed") else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    print(f"{args.num_prompts} requests, {args.concurrency} concurrent, {args.input_len} prompt / "
          f"{args.output_len} output tokens, {args.rounds} rounds", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            order = ["thread", "process"] if r % 2 == 0 else ["process", "thread"]
            for mode in order:
                rows.append(run_once(mode, args, workdir, len(rows)))
    means = {mode: {k: sum(x[k] for x in rows if x["mode"] == mode) /
                    sum(1 for x in rows if x["mode"] == mode) for k in (*FIELDS, *CONTEXT)}
             for mode in MODES}
    print("mean per mode:")
    for mode, m in means.items():
        print(format_row({"mode": mode, **m}))
    ratios = {k: means["process"][k] / means["thread"][k] for k in FIELDS}
    print("process / thread: " + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"settings": vars(args), "runs": rows, "means": means, "ratios": ratios},
                      f, indent=1)


if __name__ == "__main__":
    main()
