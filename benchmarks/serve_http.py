"""HTTP serving overhead: the same workload through `pagoda serve` and through the engine alone.

Workload (defaults): 64 requests of 128 random prompt tokens and 128 output tokens (ignore_eos,
greedy), at most 32 in flight, prompts sent as token ids so every side sees identical inputs.
Three sides, measured one after another in the same run:

1. engine: an `LLMEngine` built in this process and stepped in a worker thread (as `AsyncLLM`
   does), a closed loop that admits a new request as soon as one finishes (no asyncio, no HTTP);
2. async: `AsyncLLM` in this process (the background engine thread + asyncio streams, no HTTP);
3. http: a `pagoda serve` subprocess, 32 streaming `/v1/completions` clients over httpx.

Per side: output tokens/s over the wall time, TTFT p50/p99 (arrival to first token, per
request) and ITL p50/p99 (gaps between successive tokens of a request). The HTTP side's figures are
client-side; the engine side's are taken when `step()` returns.

Usage: nice python benchmarks/serve_http.py [--num-requests 64] [--concurrency 32]
       [--input-len 128] [--output-len 128] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import httpx
from local_servers import free_port

KV_CACHE_MEMORY = 512 << 20  # room for 32 requests x 256 tokens in fp32 (about 400 MB)


@dataclass
class Trace:
    """One request's timeline: arrival, then the time each token became visible."""

    start: float
    token_times: list[float] = field(default_factory=list)


@dataclass
class Summary:
    side: str
    wall_s: float
    num_output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(side: str, traces: list[Trace], wall: float) -> Summary:
    ttfts = [t.token_times[0] - t.start for t in traces]
    itls = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    num = sum(len(t.token_times) for t in traces)
    return Summary(side, wall, num, num / wall, 1e3 * percentile(ttfts, 0.5),
                   1e3 * percentile(ttfts, 0.99), 1e3 * percentile(itls, 0.5),
                   1e3 * percentile(itls, 0.99))


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def run_engine(prompts: list[list[int]], args: argparse.Namespace) -> Summary:
    """Built in the main thread, stepped in a worker thread — exactly as `AsyncLLM` does. On this
    2-core box under load, stepping from the thread that built the engine was 3-25x slower
    (torch's intra-op thread pool; measured 2026-11-25, see docs/server.md)."""
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_memory=KV_CACHE_MEMORY, progress=False))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_engine_loop, engine, prompts, args).result()


def _engine_loop(engine, prompts: list[list[int]], args: argparse.Namespace) -> Summary:
    from pagoda.sampling.params import SamplingParams

    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    engine.add_request("warmup", prompts[0][:16], SamplingParams(max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    traces: dict[str, Trace] = {}
    queue = list(enumerate(prompts))
    num_in_flight = 0
    t0 = time.perf_counter()
    while queue or engine.has_unfinished_requests():
        while queue and num_in_flight < args.concurrency:
            i, ids = queue.pop(0)
            traces[f"r{i}"] = Trace(time.perf_counter())
            engine.add_request(f"r{i}", ids, params)
            num_in_flight += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            for o in out.outputs:
                traces[out.req_id].token_times += [now] * len(o.token_ids)
            num_in_flight -= out.finished
    return summarize("engine", list(traces.values()), time.perf_counter() - t0)


async def run_async(prompts: list[list[int]], args: argparse.Namespace) -> Summary:
    from pagoda.engine.async_llm import AsyncLLM
    from pagoda.engine.config import EngineConfig
    from pagoda.sampling.params import SamplingParams

    llm = AsyncLLM.from_config(EngineConfig(kv_cache_memory=KV_CACHE_MEMORY, progress=False))
    llm.start(asyncio.get_running_loop())
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    async for _ in llm.generate(prompts[0][:16], SamplingParams(max_tokens=4)):
        pass
    gate = asyncio.Semaphore(args.concurrency)

    async def one(ids: list[int]) -> Trace:
        async with gate:
            trace = Trace(time.perf_counter())
            async for out in llm.generate(ids, params):
                now = time.perf_counter()
                for o in out.outputs:
                    trace.token_times += [now] * len(o.token_ids)
            return trace

    t0 = time.perf_counter()
    traces = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    llm.shutdown()
    return summarize("async", list(traces), wall)


async def run_http(prompts: list[list[int]], args: argparse.Namespace) -> Summary:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pagoda = os.path.join(os.path.dirname(sys.executable), "pagoda")
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([pagoda, "serve", "--port", str(port), "--kv-cache-memory",
                               str(KV_CACHE_MEMORY), "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=args.concurrency + 4)
                                     ) as http:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("pagoda serve did not start")
                await asyncio.sleep(0.2)
            await http.post("/v1/completions", json={"prompt": prompts[0][:16], "max_tokens": 4})
            gate = asyncio.Semaphore(args.concurrency)

            async def one(ids: list[int]) -> Trace:
                body = {"prompt": ids, "max_tokens": args.output_len, "ignore_eos": True,
                        "temperature": 0, "stream": True, "logprobs": 0}
                async with gate:
                    trace = Trace(time.perf_counter())
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            now = time.perf_counter()
                            for choice in json.loads(line[6:])["choices"]:
                                # logprobs=0 gives one entry per token, so multi-token chunks
                                # and tokens with no visible text are counted exactly
                                num = len((choice.get("logprobs") or {}).get("tokens") or [])
                                trace.token_times += [now] * num
                    return trace

            t0 = time.perf_counter()
            traces = await asyncio.gather(*(one(p) for p in prompts))
            wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(60)
    return summarize("http", list(traces), wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--sides", default="engine,async,http")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    from pagoda.loader.model_loader import resolve_model_path
    from pagoda.loader.tokenizer import Tokenizer

    path = resolve_model_path(None)
    vocab = Tokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    prompts = make_prompts(args.num_requests, args.input_len, vocab.vocab_size)
    results = []
    for side in args.sides.split(","):
        load = os.getloadavg()[0]
        if side == "engine":
            summary = run_engine(prompts, args)
        elif side == "async":
            summary = asyncio.run(run_async(prompts, args))
        else:
            summary = asyncio.run(run_http(prompts, args))
        results.append({**asdict(summary), "load_avg_1m_before": load})
        print(json.dumps(results[-1]), flush=True)
    base = results[0]
    print(f"\n{'side':8} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8}"
          f" {'load':>5}")
    for r in results:
        print(f"{r['side']:8} {r['output_tok_s']:8.1f} {r['ttft_p50_ms']:9.0f} "
              f"{r['ttft_p99_ms']:8.0f} {r['itl_p50_ms']:8.1f} {r['itl_p99_ms']:8.1f} "
              f"{r['load_avg_1m_before']:5.1f}")
    for r in results[1:]:
        print(f"{r['side']} / {base['side']} throughput: "
              f"{r['output_tok_s'] / base['output_tok_s']:.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "results": results,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=2)


if __name__ == "__main__":
    main()
