"""Microbenchmark: time per call and GOP/s of Pagoda's quantized linears vs fp32 `F.linear`.

Weights are cold as in a real forward: each measurement cycles through `--copies` distinct weight
matrices (one model has 30 layers), so no matrix stays in cache between its calls. Every method is
measured in the same process, interleaved per shape and row count, so ratios are comparable even
on a shared, noisy machine; each figure is the median over `--rounds` rounds.

    nice -n 10 .venv/bin/python benchmarks/quant_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.quant.group_linear import GroupLinear
from pagoda.quant.half_linear import HalfLinear
from pagoda.quant.int8_linear import Int8Linear

# SmolLM2-135M linears as (name, out_features, in_features). qkv is 960 wide (9 q heads + 2x3 kv
# heads of 64); 1728 is the shape of a model without GQA, kept for comparison with other notes.
SHAPES = [("qkv_proj", 960, 576), ("qkv_mha", 1728, 576), ("o_proj", 576, 576),
          ("gate_up_proj", 3072, 576), ("down_proj", 576, 1536), ("lm_head", 49152, 576)]
ROWS = (1, 8, 32, 64, 256)


def build(method: str, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w
    if method == "fp32":
        return lambda x: F.linear(x, w)
    if method == "bf16-gemm":  # bf16 weights AND activations (--dtype bf16); AMX runs it natively
        wb = w.bfloat16()
        return lambda x: F.linear(x.bfloat16(), wb)
    if method.startswith("int8"):  # int8 = auto (igemm); int8-<kernel> forces one, e.g.
        # int8-onednn, int8-fbgemm, int8-igemm-avx2, int8-wgemm-avx512
        m = Int8Linear.from_linear(linear, backend=method.partition("-")[2] or "auto")
    elif method == "int4-ref":  # the portable dequantize + matmul path (what CUDA runs)
        m = GroupLinear.from_linear(linear, 64, backend="reference")
    elif method.startswith("int4"):  # int4g<G>: auto; int4g<G>-<kernel> forces one, e.g.
        # int4g32-wgemm-avx2, int4g32-igemm-avx512
        group, _, kernel = method[len("int4g"):].partition("-")
        m = GroupLinear.from_linear(linear, group_size=int(group), backend=kernel or "auto")
    elif method == "fp16":
        m = HalfLinear.from_linear(linear, "fp16")
    elif method == "int8pack_mm":  # torch's weight-only int8 op, for comparison
        m = Int8Linear.from_linear(linear)
        q, s = m.qweight, m.scale
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s)
    else:
        raise ValueError(method)
    m.prepare()
    return m


def time_calls(fns: list[Callable], x: torch.Tensor, rounds: int, min_seconds: float) -> float:
    """Median seconds per call over rounds; each round calls every copy at least once."""
    for fn in fns[:2]:
        fn(x)
    per_call = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            for fn in fns:
                fn(x)
            calls += len(fns)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / rounds:
                break
        per_call.append(elapsed / calls)
    return statistics.median(per_call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--copies", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.4, help="target seconds per figure")
    ap.add_argument("--methods", default="fp32,int8,int4g64,fp16,int4-ref,int8pack_mm",
                    help="also: int8-onednn, int8-fbgemm, int8-qgemm-avx2, bf16-gemm, int4g32, "
                    "int4g32-igemm-avx2, int4g32-wgemm-avx512 (a group size and a kernel)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"# quant_kernels {datetime.datetime.now().isoformat(timespec='minutes')} "
          f"torch {torch.__version__} threads {torch.get_num_threads()} "
          f"copies {args.copies} {platform.processor() or platform.machine()}")
    print("| shape | rows | " + " | ".join(f"{m} us (GOP/s)" for m in methods)
          + " | int8 speed-up vs fp32 |")
    print("|---|---:|" + "---:|" * len(methods) + "---:|")
    torch.manual_seed(0)
    for name, n, k in SHAPES:
        if name not in args.shapes.split(","):
            continue
        # Large matrices are cold after a few copies; 30 lm_heads would need 6 GB in fp32.
        copies = args.copies if n * k < 4_000_000 else 3
        weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        fns = {m: [build(m, w) for w in weights] for m in methods}
        for rows in rows_list:
            x = torch.randn(rows, k)
            cells, secs = [], {}
            for m in methods:
                slow = m in ("int8pack_mm", "int4-ref") and rows * n * k > 64 * 3072 * 576
                if slow:  # these run at a few GOP/s; skip the big cases to bound run time
                    cells.append("-")
                    continue
                secs[m] = time_calls(fns[m], x, args.rounds, args.seconds)
                gops = 2 * rows * n * k / secs[m] / 1e9
                cells.append(f"{secs[m] * 1e6:.0f} ({gops:.0f})")
            ratio = (f"{secs['fp32'] / secs['int8']:.1f}x" if "fp32" in secs and "int8" in secs
                     else "-")
            print(f"| {name} {n}x{k} | {rows} | " + " | ".join(cells) + f" | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
