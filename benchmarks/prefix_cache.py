"""Prefix caching on vs off, measured in the same run on the engine (no HTTP).

Workload: N requests sharing a long system prompt, each with its own short suffix, all submitted
at once. Reports TTFT p50/p99 (submission to first token) and output throughput for each setting.

    python benchmarks/prefix_cache.py [--num-requests 64] [--prefix-len 512] [--suffix-len 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tqdm import tqdm

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import load_model
from pagoda.sampling.params import SamplingParams


def run(engine: LLMEngine, prompts: list[list[int]], output_len: int, label: str) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.monotonic()
    for i, p in enumerate(prompts):
        engine.add_request(f"{label}-{i}", p, params, arrival_time=start)
    ttft, produced = {}, 0
    with tqdm(total=len(prompts), desc=label) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced += sum(len(o.token_ids) for o in out.outputs)
                if out.req_id not in ttft:
                    ttft[out.req_id] = out.metrics.first_token_time - start
                bar.update(int(out.finished))
    seconds = time.monotonic() - start
    values = sorted(ttft.values())
    return {"label": label, "ttft_p50": statistics.median(values),
            "ttft_p99": values[min(len(values) - 1, int(0.99 * len(values)))],
            "tok_s": produced / seconds, "seconds": seconds,
            "hit_tokens": engine.kv_manager.num_hit_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    args = p.parse_args()
    loaded = load_model(args.model)
    rng = random.Random(0)
    special = loaded.tokenizer.all_special_ids
    vocab = [t for t in range(min(loaded.config.vocab_size, 32000)) if t not in special]
    prefix = [rng.choice(vocab) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.choice(vocab) for _ in range(args.suffix_len)]
               for _ in range(args.num_requests)]
    results = []
    for caching in (False, True):
        engine = LLMEngine(EngineConfig(enable_prefix_caching=caching, progress=False),
                           loaded=loaded)
        run(engine, prompts[:2], 2, "warmup")
        # Start cold: the measured run must compute the shared prefix once itself.
        engine.kv_manager.pool.reset_cache()
        engine.kv_manager.num_hit_tokens = 0
        results.append(run(engine, prompts, args.output_len,
                           "cache-on" if caching else "cache-off"))
    off, on = results
    print(f"\n{args.num_requests} requests: {args.prefix_len}-token shared prefix + "
          f"{args.suffix_len} own tokens, {args.output_len} output tokens")
    for r in results:
        print(f"  {r['label']:<10} TTFT p50 {r['ttft_p50']:7.2f} s  p99 {r['ttft_p99']:7.2f} s  "
              f"{r['tok_s']:7.1f} output tok/s  ({r['seconds']:.1f} s, "
              f"{r['hit_tokens']} prompt tokens from cache)")
    print(f"  TTFT p50 {off['ttft_p50'] / on['ttft_p50']:.1f}x lower with the cache; "
          f"throughput {on['tok_s'] / off['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
