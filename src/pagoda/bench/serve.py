"""`pagoda bench serve`: benchmark a running OpenAI-compatible server (Pagoda, llama-server, vLLM).

Flow: resolve the model (first of GET /v1/models unless given) -> detect the server's tokenizer ->
build the dataset -> run the load between two snapshots of the server's spec-decode counters ->
summarize -> print, and save when asked.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any

import httpx

from pagoda.bench.client import ENDPOINTS, EndpointConfig
from pagoda.bench.dataset import DATASETS, DatasetConfig, build_dataset
from pagoda.bench.metrics import parse_slos, summarize
from pagoda.bench.report import BenchResult, check_writable, format_report
from pagoda.bench.runner import LoadConfig, run_load
from pagoda.bench.server_metrics import (
    fetch_engine_layout,
    fetch_spec_decode_counters,
    spec_decode_summary,
)
from pagoda.bench.tokenizer import detect_tokenizer


def parse_rate(text: str) -> float:
    rate = float(text)  # accepts "inf"
    if not rate > 0:
        raise argparse.ArgumentTypeError("request rate must be positive or inf")
    return rate


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload and target options, shared by `bench serve` and `bench sweep`."""
    p = parser
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--model", default=None, help="model name (default: first of GET /v1/models)")
    p.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions")
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random datasets)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths vary by ±this fraction")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="shared-prefix dataset only")
    p.add_argument("--num-prefixes", type=int, default=1,
                   help="shared-prefix dataset: distinct prefixes the prompts cycle through")
    p.add_argument("--chat-file", default=None, help="JSONL of message lists (chat-file dataset)")
    p.add_argument("--request-rate", type=parse_rate, default=math.inf, help="req/s or inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS")
    p.add_argument("--warmup", type=int, default=0, help="untimed requests sent first")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, seconds")
    p.add_argument("--disable-tqdm", action="store_true")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """Every serve option as JSON-safe values (inf becomes the string "inf")."""
    keys = [
        "base_url", "model", "endpoint", "dataset", "num_prompts", "input_len", "output_len",
        "range_ratio", "shared_prefix_len", "num_prefixes", "chat_file", "request_rate",
        "burstiness", "max_concurrency", "seed", "ignore_eos", "warmup", "goodput", "timeout",
    ]  # fmt: skip
    settings = {k: getattr(args, k) for k in keys}
    if math.isinf(settings["request_rate"]):
        settings["request_rate"] = "inf"
    return settings


def root_url_of(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def first_model(client: httpx.AsyncClient, root_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await client.get(f"{root_url}/v1/models", headers=headers)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__  # a timeout's message is empty
        message = f"cannot list models at {root_url}/v1/models ({reason}); pass --model"
        raise ValueError(message) from exc


async def benchmark(args: argparse.Namespace) -> BenchResult:
    """Run one serving benchmark as described by the parsed serve options."""
    root_url = root_url_of(args.base_url)
    slos = parse_slos(args.goodput)
    dataset_config = DatasetConfig(
        name=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        shared_prefix_len=args.shared_prefix_len,
        num_prefixes=args.num_prefixes,
        chat_file=args.chat_file,
        seed=args.seed,
    )
    if args.dataset == "chat-file" and args.endpoint != "chat":
        raise ValueError("the chat-file dataset needs --endpoint chat")
    load = LoadConfig(
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        warmup=args.warmup,
        seed=args.seed,
        show_progress=not args.disable_tqdm,
        timeout_s=args.timeout,
    )
    # the model list and tokenizer: at most a minute, and never past the run's own --timeout
    async with httpx.AsyncClient(timeout=httpx.Timeout(min(60.0, args.timeout))) as setup_client:
        model = args.model or await first_model(setup_client, root_url, args.api_key)
        tokenizer = await detect_tokenizer(setup_client, root_url)
        requests = await build_dataset(dataset_config, tokenizer)
    endpoint = EndpointConfig(
        root_url=root_url,
        model=model,
        endpoint=args.endpoint,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
    )
    # The snapshots bracket run_load, so warmup requests are part of the spec-decode numbers.
    spec_before = await fetch_spec_decode_counters(root_url, args.api_key)
    outcome = await run_load(endpoint, requests, load)
    spec_after = await fetch_spec_decode_counters(root_url, args.api_key)
    summary = summarize(outcome.records, outcome.duration_s, outcome.peak_concurrency, slos)
    settings = {**settings_of(args), "model": model,
                "server_layout": await fetch_engine_layout(root_url, args.api_key)}
    return BenchResult(
        settings,
        tokenizer.name,
        summary,
        outcome.records,
        spec_decode=spec_decode_summary(spec_before, spec_after),
    )


def run_serve(args: argparse.Namespace) -> int:
    if args.save_result:
        check_writable(args.save_result)
    result = asyncio.run(benchmark(args))
    if args.save_result:  # saved before printing, so a closed stdout cannot lose the run
        result.save(args.save_result)
    print(format_report(result))
    if args.save_result:
        print(f"saved {args.save_result}")
    if result.summary.completed == 0:  # a script running the bench must see that it failed
        print("pagoda bench serve: error: no request succeeded", file=sys.stderr)
        return 1
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    parser = bench_sub.add_parser(
        "serve", help="benchmark a running OpenAI-compatible server with streamed requests"
    )
    add_serve_arguments(parser)
    parser.add_argument("--save-result", default=None, metavar="PATH", help="write run JSON")
    parser.set_defaults(func=run_serve)
