"""A finished benchmark run: the printed report and the JSON file (`--save-result`).

The JSON holds everything needed to re-plot or re-cost a run without the server:
{"format": 1, "kind": "serve", "created": ISO time, "settings": {...every CLI setting...},
 "tokenizer": "server:pagoda" | "server:llama.cpp" | "words", "summary": {...}, "records": [...],
 "spec_decode": {...} | null}. "spec_decode" (the server's speculative-decoding counters over the
run) was added later without a format bump: files without it load with `spec_decode=None`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.bench.client import RequestRecord
from pagoda.bench.metrics import LatencyStats, Summary
from pagoda.bench.server_metrics import SpecDecodeSummary

RESULT_FORMAT = 1


@dataclass
class BenchResult:
    settings: dict[str, Any]
    tokenizer: str
    summary: Summary
    records: list[RequestRecord] = field(default_factory=list)
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    # None when the server exports no spec-decode counters or drafted nothing during the run
    spec_decode: SpecDecodeSummary | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "kind": "serve",
            "created": self.created,
            "settings": self.settings,
            "tokenizer": self.tokenizer,
            "summary": self.summary.to_json(),
            "records": [r.to_json() for r in self.records],
            "spec_decode": self.spec_decode.to_json() if self.spec_decode else None,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such result file: {path}")
        try:
            data = json.loads(path.read_text())
            spec = data.get("spec_decode")
            return cls(
                settings=data["settings"],
                tokenizer=data.get("tokenizer", "unknown"),
                summary=Summary.from_json(data["summary"]),
                records=[RequestRecord.from_json(r) for r in data.get("records", [])],
                created=data.get("created", ""),
                spec_decode=SpecDecodeSummary.from_json(spec) if spec else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            # AttributeError: a JSON array or scalar at the top, or inside where objects belong
            raise ValueError(f"{path} is not a `pagoda bench serve` result: {exc}") from exc


def check_writable(path: str | Path) -> None:
    """Refuse, before a run, a result path that cannot be written: an existing directory, or
    under a file (the run would be measured, then lost when it is saved)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name for the result")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot save under {parent}: it is a file")
            break


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value:>14}"


def _latency_rows(title: str, short: str, stats: LatencyStats) -> list[str]:
    return [
        f" {title} ".center(54, "-"),
        _row(f"Mean {short} (ms):", stats.mean),
        _row(f"Median {short} (ms):", stats.median),
        _row(f"P95 {short} (ms):", stats.p95),
        _row(f"P99 {short} (ms):", stats.p99),
    ]


def _spec_decode_rows(spec: SpecDecodeSummary) -> list[str]:
    lines = [
        " Speculative Decoding ".center(54, "-"),
        _row("Drafts:", spec.num_drafts),
        _row("Draft tokens:", spec.num_draft_tokens),
        _row("Accepted tokens:", spec.num_accepted_tokens),
        _row("Acceptance rate (%):", spec.acceptance_rate * 100),
        _row("Mean accepted length (tok/pass):", spec.mean_accepted_length),
    ]
    for pos, rate in enumerate(spec.accepted_per_pos_rates):
        lines.append(_row(f"  Position {pos} acceptance (%):", rate * 100))
    return lines


def format_report(result: BenchResult) -> str:
    """A fixed-width table in the layout of vLLM's serving benchmark."""
    s = result.summary
    settings = result.settings
    lines = [
        " Serving Benchmark Result ".center(54, "="),
        _row("Successful requests:", s.completed),
        _row("Failed requests:", s.failed),
        _row("Maximum request concurrency:", str(settings.get("max_concurrency"))),
        _row("Request rate (req/s):", str(settings.get("request_rate"))),
        _row("Peak concurrent requests:", s.peak_concurrency),
        _row("Benchmark duration (s):", s.duration_s),
        _row("Total input tokens:", s.total_input_tokens),
        _row("Total generated tokens:", s.total_output_tokens),
        _row("Request throughput (req/s):", s.request_throughput),
        _row("Output token throughput (tok/s):", s.output_throughput),
        _row("Total token throughput (tok/s):", s.total_token_throughput),
    ]
    if s.goodput is not None and s.good_requests is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in s.slos_ms.items())
        lines += [
            _row("Requests meeting SLOs:", f"{s.good_requests}/{s.num_requests}"),
            _row("Goodput fraction:", s.good_requests / max(1, s.num_requests)),
            _row("Request goodput (req/s):", s.goodput),
            f"  (SLOs: {slos})",
        ]
    lines += _latency_rows("Time to First Token", "TTFT", s.ttft_ms)
    lines += _latency_rows("Time per Output Token (excl. 1st token)", "TPOT", s.tpot_ms)
    lines += _latency_rows("Inter-token Latency", "ITL", s.itl_ms)
    lines += _latency_rows("End-to-end Latency", "E2EL", s.e2e_ms)
    if result.spec_decode is not None:
        lines += _spec_decode_rows(result.spec_decode)
    lines.append("=" * 54)
    if result.tokenizer == "words":
        lines.append("note: the server has no /tokenize; prompt lengths are counted in words")
    for error, count in sorted(s.errors.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"error x{count}: {error}")
    return "\n".join(lines)
