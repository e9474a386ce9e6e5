"""`pagoda bench offline`: the engine alone (no HTTP) on a fixed random-token workload.

Figures, all measured in one run so they can be compared as ratios:
- output tok/s of N requests submitted at once (prefill time included);
- batch-1 decode tok/s (time per token after the first);
- optionally the same workload through Hugging Face transformers `generate` (same weights);
- optionally static vs continuous batching on mixed output lengths.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from pagoda.bench.report import check_writable
from pagoda.cli.engine_args import add_engine_args, engine_config_from_args


@dataclass
class OfflineResult:
    label: str
    num_requests: int
    output_tokens: int
    seconds: float
    ttft_p50: float = 0.0  # seconds from submission (all at once) to first token
    ttft_p99: float = 0.0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("offline", help="engine-only throughput (and HF transformers baseline)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--mixed-output", default=None, metavar="LO:HI",
                   help="output lengths uniform in [LO, HI] (e.g. 16:256) instead of fixed")
    p.add_argument("--compare-batching", action="store_true",
                   help="run static and continuous batching on the same workload")
    p.add_argument("--hf", action="store_true", help="also run HF transformers generate")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64,
                   help="tokens for the batch-1 decode measurement (0 to skip)")
    p.add_argument("--bench-seed", type=int, default=0)
    p.add_argument("--save-result", default=None)
    add_engine_args(p)
    p.set_defaults(func=run)


def make_workload(vocab_size: int, special: set[int], n: int, input_len: int,
                  output_lens: list[int], seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    ordinary = [t for t in range(min(vocab_size, 32000)) if t not in special]
    return [([rng.choice(ordinary) for _ in range(input_len)], output_lens[i]) for i in range(n)]


def run_engine(engine, workload, label: str) -> OfflineResult:
    from pagoda.sampling.params import SamplingParams

    start = time.perf_counter()
    for i, (ids, out_len) in enumerate(workload):
        engine.add_request(f"{label}-{i}", ids, SamplingParams(
            temperature=0, max_tokens=out_len, ignore_eos=True))
    produced = 0
    first: dict[str, float] = {}
    with tqdm(total=len(workload), desc=label, unit="req") as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced += sum(len(o.token_ids) for o in out.outputs)
                first.setdefault(out.req_id, time.perf_counter() - start)
                bar.update(int(out.finished))
    ttfts = sorted(first.values())
    return OfflineResult(label, len(workload), produced, time.perf_counter() - start,
                         ttfts[len(ttfts) // 2], ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))])


def engine_decode_rate(engine, prompt: list[int], num_tokens: int) -> float:
    from pagoda.sampling.params import SamplingParams

    engine.add_request("decode", prompt, SamplingParams(temperature=0, max_tokens=num_tokens,
                                                        ignore_eos=True))
    def tokens(outputs) -> int:
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)

    # prefill + first token (a pipeline's first step only starts the batch); then count tokens,
    # not steps: a step may emit several (speculation) or none (a pipeline's submit)
    while engine.has_unfinished_requests() and not tokens(engine.step()):
        pass
    start = time.perf_counter()
    produced = 0
    while engine.has_unfinished_requests():
        produced += tokens(engine.step())
    return produced / (time.perf_counter() - start)


def run_hf(loaded, workload, batch_size: int, decode_tokens: int) -> tuple[OfflineResult, float]:
    import os

    import torch
    from transformers import AutoModelForCausalLM
    path = loaded.path
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    start = time.perf_counter()
    produced = 0
    with torch.inference_mode():
        for b in tqdm(range(0, len(workload), batch_size), desc="transformers", unit="batch"):
            chunk = workload[b:b + batch_size]
            ids = torch.tensor([p for p, _ in chunk])  # equal lengths: no padding needed
            n = max(o for _, o in chunk)
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
            produced += sum(min(o, out.shape[1] - ids.shape[1]) for _, o in chunk)
        batched = OfflineResult("transformers", len(workload), produced,
                                time.perf_counter() - start)
        rate = 0.0
        if decode_tokens:
            ids = torch.tensor([workload[0][0]])
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1,
                           do_sample=False, pad_token_id=0)
            rate = decode_tokens / (time.perf_counter() - t0 - first)
    return batched, rate


def run(args: argparse.Namespace) -> int:
    from pagoda.engine.llm_engine import LLMEngine

    for name in ("num_prompts", "input_len", "output_len", "hf_batch_size"):
        if getattr(args, name) < 1:  # checked before the model loads
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.decode_tokens < 0:
        raise ValueError("--decode-tokens must be 0 (skip) or more")
    if args.save_result:
        check_writable(args.save_result)
    rng = random.Random(args.bench_seed + 1)
    if args.mixed_output:
        try:
            lo, hi = (int(x) for x in args.mixed_output.split(":"))
        except ValueError:
            raise ValueError("--mixed-output takes LO:HI output lengths, e.g. 16:256") from None
        if not 1 <= lo <= hi:
            raise ValueError("--mixed-output takes LO:HI with 1 <= LO <= HI")
        out_lens = [rng.randint(lo, hi) for _ in range(args.num_prompts)]
    else:
        out_lens = [args.output_len] * args.num_prompts
    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    tok = engine.tokenizer
    workload = make_workload(engine.model_config.vocab_size, tok.all_special_ids,
                             args.num_prompts, args.input_len, out_lens, args.bench_seed)
    run_engine(engine, workload[:2], "warmup")
    results = [run_engine(engine, workload, f"pagoda-{config.batching}")]
    if args.compare_batching:
        other = "static" if config.batching == "continuous" else "continuous"
        engine2 = LLMEngine(engine_config_from_args(args, batching=other), loaded=engine.loaded)
        results.append(run_engine(engine2, workload, f"pagoda-{other}"))
    decode = {}
    if args.decode_tokens:
        decode["pagoda"] = engine_decode_rate(engine, workload[0][0], args.decode_tokens)
    if args.hf:
        hf, hf_rate = run_hf(engine.loaded, workload, args.hf_batch_size, args.decode_tokens)
        results.append(hf)
        if args.decode_tokens:
            decode["transformers"] = hf_rate
    print(f"\nworkload: {args.num_prompts} requests x {args.input_len} prompt tokens, output "
          f"{args.mixed_output or args.output_len} tokens (ignore_eos); dtype {config.dtype}, "
          f"quantization {engine.config.quantization}")
    base = results[-1].output_tok_s
    for r in results:
        print(f"  {r.label:<22} {r.output_tokens:>6} tokens in {r.seconds:7.2f} s  "
              f"{r.output_tok_s:8.1f} output tok/s  ({r.output_tok_s / base:.2f}x "
              f"{results[-1].label})" + (f"  TTFT p50 {r.ttft_p50:.2f} s p99 {r.ttft_p99:.2f} s"
                                         if r.ttft_p50 else ""))
    for name, rate in decode.items():
        print(f"  batch-1 decode {name:<14} {rate:8.1f} tok/s")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       "results": [asdict(r) | {"output_tok_s": r.output_tok_s} for r in results],
                       "decode_tok_s": decode}, f, indent=2)
    return 0
