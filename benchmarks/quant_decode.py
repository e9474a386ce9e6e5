"""Batch-1 decode and 32-concurrent throughput, fp32 vs quantized, interleaved in one process.

On a shared machine, absolute speeds drift by several times within minutes. Here the precisions
take turns in short rounds, and medians and ratios are reported, so a load spike hits all of
them alike.

    nice -n 10 .venv/bin/python benchmarks/quant_decode.py --threads 1 --methods none,int8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import load_model
from pagoda.quant.loading import apply_quantization
from pagoda.quant.quality import PROMPTS, run_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="none,int8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(None, progress=False)
    engines = {}
    for method in args.methods.split(","):
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)
        if method != "none":
            apply_quantization(loaded, method)
        engines[method] = LLMEngine(EngineConfig(progress=False, max_num_seqs=args.concurrency),
                                    loaded=loaded)
    single: dict[str, list[float]] = {m: [] for m in engines}
    batch: dict[str, list[float]] = {m: [] for m in engines}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
    for _ in range(args.rounds):
        for method, engine in engines.items():
            single[method].append(run_engine(engine, [PROMPTS[1]], args.tokens).decode_tok_per_s)
            batch[method].append(run_engine(engine, prompts, args.tokens).output_tok_per_s)
    print(f"# quant_decode {datetime.datetime.now().isoformat(timespec='minutes')} threads "
          f"{torch.get_num_threads()} rounds {args.rounds} tokens {args.tokens}")
    print(f"| precision | batch-1 decode tok/s (median) | vs fp32 | "
          f"{args.concurrency}-concurrent output tok/s | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    ref = "none" if "none" in engines else next(iter(engines))
    for method in engines:
        s, b = statistics.median(single[method]), statistics.median(batch[method])
        s0, b0 = statistics.median(single[ref]), statistics.median(batch[ref])
        name = "fp32" if method == "none" else method
        print(f"| {name} | {s:.1f} | {s / s0:.2f}x | {b:.1f} | {b / b0:.2f}x |")


if __name__ == "__main__":
    main()
