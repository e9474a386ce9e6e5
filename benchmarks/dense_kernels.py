"""Microbenchmark: the fp32 linears of one SmolLM2-135M forward on each dense kernel.

One "forward" is the model's 121 linears with distinct weights (30 layers of qkv 960 x 576, o
576 x 576, gate_up 3072 x 576, down 576 x 1536, and the 49152 x 576 LM head; ~620 MB of fp32),
so no weight stays in cache between its calls, as in a decode step. Kernels: fgemm in every ISA
flavour this CPU runs (kernels/fgemm.py), oneDNN on reordered weights and torch's F.linear (MKL).
They alternate within each round, row count by row count; each figure is the fastest of
`--rounds`. oneDNN and MKL pick their own ISA: cap them with ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 to compare with fgemm's avx2 flavour as an AVX2 CPU would run them.

    .venv/bin/python benchmarks/dense_kernels.py [--rows 1,2,4,9,12,16,64,256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import build
from pagoda.kernels.fgemm import pack
from pagoda.layers.dense_linear import PackedLinear

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def kernels(weights: list[torch.Tensor]) -> dict[str, list[Callable[[torch.Tensor], object]]]:
    out: dict[str, list[Callable[[torch.Tensor], object]]] = {}
    packed = [pack(w) for w in weights]
    for flavour in build.runnable_flavours():
        module = build.load(flavour)
        if module is None or flavour == "generic":  # generic: scalar C++, minutes per forward
            continue
        out[f"fgemm-{flavour}"] = [
            (lambda x, p=p, m=module: m.fgemm(x, p.w, p.out_features)) for p in packed]
    onednn = []
    for w in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight = nn.Parameter(w, requires_grad=False)
        onednn.append(PackedLinear.from_linear(linear, "onednn"))
    out["onednn"] = onednn
    out["mkl"] = [(lambda x, w=w: F.linear(x, w)) for w in weights]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,9,12,16,64,256")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.split(":")[-1].strip()
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                       "PAGODA_KERNEL_ISA") if k in os.environ}
    flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile")
             if f in build.cpu_flags()]
    print(f"# dense kernels, {datetime.date.today()}, CPU: {cpu}, threads "
          f"{torch.get_num_threads()}, flags: {' '.join(flags)}"
          f"{', caps: ' + str(caps) if caps else ''}")
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for _ in range(30) for n, k in LAYER]
    weights.append(torch.randn(*LM_HEAD) * 0.02)
    runs = kernels(weights)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"\nms per forward (121 linears), fastest of {args.rounds}\n")
    print("| rows | " + " | ".join(runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    with torch.inference_mode():
        for m in rows:
            xs = {k: torch.randn(m, k) for k in (576, 1536)}
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.rounds):
                for name, calls in runs.items():
                    start = time.perf_counter()
                    for w, call in zip(weights, calls, strict=True):
                        call(xs[w.shape[1]])
                    best[name] = min(best[name], time.perf_counter() - start)
            print(f"| {m} | " + " | ".join(f"{best[n] * 1e3:.1f}" for n in runs) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
