"""`pagoda bench plot run.json [...] --out DIR`: PNG plots of saved serving runs.

  latency_cdf.png        empirical CDFs of TTFT, ITL and E2E latency, one line per run
  throughput_latency.png output throughput and TTFT p50/p99 against the load knob (max concurrency
                         when every run has one, else request rate), plus throughput vs TPOT p50
Matplotlib runs on the Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from pagoda.bench.report import BenchResult  # noqa: E402

Labelled = list[tuple[str, BenchResult]]


def _cdf(ax: plt.Axes, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    xs = np.sort(np.asarray(values_ms))
    ys = np.arange(1, xs.size + 1) / xs.size
    ax.step(xs, ys, where="post", label=label)


def plot_latency_cdfs(runs: Labelled, out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, result in runs:
        ok = [r for r in result.records if r.success]
        _cdf(axes[0], [r.ttft_s * 1000 for r in ok if r.ttft_s is not None], label)
        _cdf(axes[1], [gap * 1000 for r in ok for gap in r.itl_s], label)
        _cdf(axes[2], [r.e2e_s * 1000 for r in ok if r.e2e_s is not None], label)
    for ax, title in zip(axes, ("TTFT", "Inter-token latency", "End-to-end latency"), strict=True):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_knob(runs: Labelled) -> tuple[str, list[float]]:
    """The x axis for cross-run plots: max concurrency if every run set it, else request rate."""
    concurrency = [r.settings.get("max_concurrency") for _, r in runs]
    if all(c is not None for c in concurrency):
        return "max concurrency", [float(c) for c in concurrency]
    rates = [float(r.settings.get("request_rate", "inf")) for _, r in runs]
    return "request rate (req/s)", rates


def plot_scaling(runs: Labelled, out_dir: Path) -> Path:
    knob, xs_raw = load_knob(runs)
    order = sorted(range(len(runs)), key=lambda i: xs_raw[i])
    summaries = [runs[i][1].summary for i in order]
    xs = [xs_raw[i] for i in order]
    finite = [x for x in xs if not math.isinf(x)]
    # An "inf" rate is drawn one step to the right of the largest finite one, and labelled so.
    inf_at = (max(finite) * 2 if finite else 1.0) if len(finite) < len(xs) else None
    xs_plot = [inf_at if math.isinf(x) else x for x in xs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].plot(xs_plot, [s.output_throughput for s in summaries], "o-", label="output tok/s")
    axes[0].plot(xs_plot, [s.total_token_throughput for s in summaries], "s--", label="total tok/s")
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title("Throughput")
    axes[1].plot(xs_plot, [s.ttft_ms.median for s in summaries], "o-", label="TTFT p50")
    axes[1].plot(xs_plot, [s.ttft_ms.p99 for s in summaries], "s--", label="TTFT p99")
    axes[1].set_ylabel("milliseconds")
    axes[1].set_title("Time to first token")
    for ax in axes[:2]:
        ax.set_xlabel(knob)
        if len(set(xs_plot)) > 1 and min(xs_plot) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs_plot, [f"{x:g}" for x in xs])
    axes[2].plot(
        [s.output_throughput for s in summaries], [s.tpot_ms.median for s in summaries], "o-"
    )
    for x, s in zip(xs, summaries, strict=True):
        axes[2].annotate(f"{x:g}", (s.output_throughput, s.tpot_ms.median), fontsize=8)
    axes[2].set_xlabel("output tokens / s")
    axes[2].set_ylabel("TPOT p50 (ms)")
    axes[2].set_title(f"Throughput vs TPOT (labels: {knob})", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "throughput_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(paths: list[str], out_dir: str | Path) -> list[Path]:
    """Load saved runs and write both plots; returns the PNG paths."""
    runs = [(Path(p).stem, BenchResult.load(p)) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_latency_cdfs(runs, out), plot_scaling(runs, out)]


def run_plot(args: argparse.Namespace) -> int:
    for path in plot_runs(args.results, args.out):
        print(f"wrote {path}")
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    parser = bench_sub.add_parser("plot", help="plot saved `bench serve` results as PNGs")
    parser.add_argument("results", nargs="+", help="run JSON files from --save-result")
    parser.add_argument("--out", default="bench_plots", help="output directory")
    parser.set_defaults(func=run_plot)
