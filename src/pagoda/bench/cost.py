"""`pagoda cost`: monthly serving cost from a measured benchmark run.

    Monthly Cost = requests/month × tokens/request × machine-seconds/token × $/hour / 3600

machine-seconds/token is measured: the run's duration divided by the output tokens it produced
(the machine served them all in that time, concurrently). The same rate gives the cost of one
million output tokens: 1e6 × machine-seconds/token × $/hour / 3600.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

FORMULA = "requests/month × tokens/request × machine-seconds/token × $/hour / 3600"


@dataclass(frozen=True)
class CostInputs:
    requests_per_month: float
    tokens_per_request: float
    machine_seconds_per_token: float
    hourly_usd: float

    def __post_init__(self) -> None:
        for name in ("requests_per_month", "tokens_per_request", "hourly_usd"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # also nan, which compares false either way
                raise ValueError(f"--{name.replace('_', '-')} must not be negative "
                                 "(and must be a finite number)")
        if not 0 < self.machine_seconds_per_token < math.inf:
            raise ValueError("machine-seconds per token must be a positive finite number")

    @property
    def monthly_usd(self) -> float:
        return (
            self.requests_per_month
            * self.tokens_per_request
            * self.machine_seconds_per_token
            * self.hourly_usd
            / 3600
        )

    @property
    def usd_per_million_tokens(self) -> float:
        return 1e6 * self.machine_seconds_per_token * self.hourly_usd / 3600


def measured_seconds_per_token(result_path: str) -> tuple[float, float, int]:
    """(machine-seconds/token, duration_s, output tokens) of a saved run."""
    path = Path(result_path)
    if not path.is_file():
        raise FileNotFoundError(f"no such result file: {path}")
    try:
        summary = json.loads(path.read_text())["summary"]
        duration = float(summary["duration_s"])
        tokens = int(summary["total_output_tokens"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a benchmark result with a summary: {exc}") from exc
    if tokens <= 0 or duration <= 0:
        raise ValueError(f"{path}: the run produced no output tokens; nothing to cost")
    return duration / tokens, duration, tokens


def format_cost(inputs: CostInputs, source: str) -> str:
    c = inputs
    return "\n".join(
        [
            f"Monthly Cost = {FORMULA}",
            f"  requests/month        = {c.requests_per_month:,.0f}",
            f"  tokens/request        = {c.tokens_per_request:,.0f}",
            f"  machine-seconds/token = {c.machine_seconds_per_token:.6g}  ({source})",
            f"  $/hour                = {c.hourly_usd:,.4g}",
            f"Monthly Cost = {c.requests_per_month:,.0f} × {c.tokens_per_request:,.0f}"
            f" × {c.machine_seconds_per_token:.6g} × {c.hourly_usd:,.4g} / 3600"
            f" = ${c.monthly_usd:,.2f}",
            f"Cost per million output tokens = 1,000,000 × {c.machine_seconds_per_token:.6g}"
            f" × {c.hourly_usd:,.4g} / 3600 = ${c.usd_per_million_tokens:,.4f}",
        ]
    )


def run_cost(args: argparse.Namespace) -> int:
    if (args.result is None) == (args.seconds_per_token is None):
        raise ValueError("give exactly one of --result RUN.json or --seconds-per-token")
    if args.result is not None:
        per_token, duration, tokens = measured_seconds_per_token(args.result)
        source = f"measured: {duration:.3f} s / {tokens:,} output tokens in {args.result}"
    else:
        per_token, source = args.seconds_per_token, "given"
    inputs = CostInputs(
        args.requests_per_month, args.tokens_per_request, per_token, args.hourly_usd
    )
    print(format_cost(inputs, source))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cost", help="monthly serving cost from a benchmark run")
    p.add_argument(
        "--result", default=None, help="run JSON from `pagoda bench serve --save-result`"
    )
    p.add_argument("--seconds-per-token", type=float, default=None, help="instead of --result")
    p.add_argument("--hourly-usd", type=float, required=True, help="machine price, $/hour")
    p.add_argument("--requests-per-month", type=float, required=True)
    p.add_argument("--tokens-per-request", type=float, required=True, help="output tokens")
    p.set_defaults(func=run_cost)
