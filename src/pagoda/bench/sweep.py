"""`pagoda bench sweep`: the serve benchmark at several loads, then the throughput-latency plot.

Exactly one of `--concurrency 1,4,16` (request rate inf, capped in-flight requests) or
`--request-rates 1,2,4` (Poisson/gamma arrivals, no cap unless --max-concurrency is given) selects
the points. Each run is saved as OUT/sweep_c<N>.json or OUT/sweep_r<R>.json beside the PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import math
from pathlib import Path

from pagoda.bench.plot import plot_runs
from pagoda.bench.report import format_report
from pagoda.bench.serve import add_serve_arguments, benchmark, parse_rate


def parse_points(text: str, kind: type) -> list:
    """Parse "1,4,16" into [1, 4, 16]; each point must be positive."""
    try:
        points = [parse_rate(p) if kind is float else int(p) for p in text.split(",") if p.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from exc
    if not points or any(p <= 0 for p in points):
        raise argparse.ArgumentTypeError(f"need a comma-separated list of positive numbers: {text}")
    return points


def sweep_points(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """(file stem, serve options) for each point of the sweep."""
    if (args.concurrency is None) == (args.request_rates is None):
        raise ValueError("give exactly one of --concurrency or --request-rates")
    points = []
    if args.concurrency is not None:
        for c in args.concurrency:
            point = copy.copy(args)
            point.max_concurrency, point.request_rate = c, math.inf
            points.append((f"sweep_c{c}", point))
    else:
        for rate in args.request_rates:
            point = copy.copy(args)
            point.request_rate = rate
            points.append((f"sweep_r{rate:g}", point))
    return points


def run_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for stem, point in sweep_points(args):
        print(f"--- {stem} ---", flush=True)
        result = asyncio.run(benchmark(point))
        path = out / f"{stem}.json"
        result.save(path)
        print(format_report(result))
        saved.append(str(path))
    for png in plot_runs(saved, out):
        print(f"wrote {png}")
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    parser = bench_sub.add_parser("sweep", help="run bench serve at several loads and plot them")
    add_serve_arguments(parser)
    parser.add_argument("--concurrency", type=lambda t: parse_points(t, int), default=None)
    parser.add_argument("--request-rates", type=lambda t: parse_points(t, float), default=None)
    parser.add_argument("--out", default="bench_sweep", help="directory for run JSONs and PNGs")
    parser.set_defaults(func=run_sweep)
