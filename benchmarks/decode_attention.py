"""Decode-step time per attention backend and KV-cache dtype, at a given context length, in the
same run.

64 requests whose prompts share all but their last 64 tokens (as with a common system prompt;
`--shared 0`: nothing shared, each reads its own blocks, as in a W1 load) are prefilled, then
`--steps` decode steps of all 64 are timed for each backend x KV dtype (the first one is the
baseline of the ratios):

    python benchmarks/decode_attention.py [--context 576] [--backends torch,cpp]
        [--kv-dtypes fp32,fp16] [--quantization none] [--shared 512] [--steps 10]
"""

from __future__ import annotations

import argparse
import random
import time

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import load_model
from pagoda.sampling.params import SamplingParams


def decode_step_ms(engine: LLMEngine, prompts: list[list[int]], steps: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids)
                               for r in sched.running):
        engine.step()
    for _ in range(2):  # warm-up decodes
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return 1e3 * seconds / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=576)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--backends", default="torch,cpp")
    p.add_argument("--kv-dtypes", default="fp32")
    p.add_argument("--shared", type=int, default=None,
                   help="prompt tokens shared by all requests (default: all but the last 64)")
    p.add_argument("--quantization", default="none")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    loaded = load_model(None)
    if args.quantization != "none":
        from pagoda.quant import apply_quantization

        apply_quantization(loaded, args.quantization)
    rng = random.Random(0)
    num_shared = args.context - 64 if args.shared is None else min(args.shared, args.context)
    shared = [rng.randrange(1000, 30000) for _ in range(num_shared)]
    prompts = [shared + [rng.randrange(1000, 30000) for _ in range(args.context - num_shared)]
               for _ in range(args.num_requests)]
    results = {}
    for backend in args.backends.split(","):
        for kv in args.kv_dtypes.split(","):
            engine = LLMEngine(EngineConfig(attention_backend=backend, kv_cache_dtype=kv,
                                            progress=False), loaded=loaded)
            name = f"{backend}/{kv}"
            results[name] = decode_step_ms(engine, prompts, args.steps)
            print(f"  {name:<11} {results[name]:7.1f} ms per decode step ({args.num_requests} "
                  f"requests, ~{args.context} tokens of context, weights "
                  f"{args.quantization})", flush=True)
    base = next(iter(results.values()))
    for name, ms in results.items():
        print(f"  {name:<11} {base / ms:5.2f}x the first")


if __name__ == "__main__":
    main()
