"""Tensor and pipeline parallelism against one process on the same cores (issue 16's benchmark).

Each configuration is a fresh `pagoda bench offline` run (one after another, nothing else
running): batch-1 decode tok/s and throughput of a batch, for one process (all threads in it),
TP=N and PP=M (the same threads split between the ranks). Prints one table with each figure's
ratio to the one-process run of the same invocation, and the CPU it ran on.

    python benchmarks/parallel.py [--tp 2 3] [--pp 2] [--quantization none int8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PAGODA = Path(sys.executable).parent / "pagoda"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run(tp: int, pp: int, quantization: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(PAGODA), "bench", "offline", "--num-prompts", str(args.num_prompts),
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                        "--decode-tokens", str(args.decode_tokens), "--threads",
                        str(args.threads), "--tensor-parallel-size", str(tp),
                        "--pipeline-parallel-size", str(pp), "--quantization",
                        quantization, "--save-result", out.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.loads(Path(out.name).read_text())
    batch = result["results"][0]
    return {"decode": result["decode_tok_s"]["pagoda"], "throughput": batch["output_tok_s"],
            "ttft": batch["ttft_p50"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="*", default=[2, 3])
    p.add_argument("--pp", type=int, nargs="*", default=[2])
    p.add_argument("--quantization", nargs="+", default=["none", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; {args.threads} threads in total; {args.num_prompts} requests x "
          f"({args.input_len} in, {args.output_len} out)")
    print(f"{'weights':8} {'ranks':>5} {'batch-1 tok/s':>14} {'ratio':>6} {'batch tok/s':>12} "
          f"{'ratio':>6} {'TTFT p50 s':>11}")
    layouts = [(1, 1)] + [(tp, 1) for tp in args.tp] + [(1, pp) for pp in args.pp]
    for quant in args.quantization:
        base = run(1, 1, quant, args)
        for tp, pp in layouts:
            r = base if tp == pp == 1 else run(tp, pp, quant, args)
            name = "1" if tp == pp == 1 else f"TP{tp}" if tp > 1 else f"PP{pp}"
            print(f"{quant:8} {name:>5} {r['decode']:>14.1f} {r['decode'] / base['decode']:>5.2f}x "
                  f"{r['throughput']:>12.1f} {r['throughput'] / base['throughput']:>5.2f}x "
                  f"{r['ttft']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
