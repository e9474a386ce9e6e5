"""Speculative-decoding counters of the server under test, read from its Prometheus `/metrics`.

Pagoda exports `pagoda:spec_decode_num_drafts_total`, `..._num_draft_tokens_total`,
`..._num_accepted_tokens_total` and `..._num_accepted_tokens_per_pos_total{position="i"}`;
vLLM exports the same names under `vllm:`. Both prefixes are read. The counters are cumulative
over the server's life, so a run's numbers are the difference of a snapshot taken before and one
taken after it. They are server-wide: traffic from other clients during the run is counted too.

`pagoda:engine_config_info` (labels: parallel sizes, threads, weights) says how the server under
test was laid out; `pagoda capacity --bench` compares layouts by it.

The endpoint is optional (llama-server has none unless started with --metrics, and then without
these counters), so every failure to fetch or parse means "no data", never an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("pagoda:", "vllm:")
_DRAFTS = "spec_decode_num_drafts_total"
_DRAFT_TOKENS = "spec_decode_num_draft_tokens_total"
_ACCEPTED = "spec_decode_num_accepted_tokens_total"
_ACCEPTED_PER_POS = "spec_decode_num_accepted_tokens_per_pos_total"


@dataclass(frozen=True)
class SpecDecodeCounters:
    """Cumulative counter values at one moment, summed over label sets (models) but kept apart
    by draft position."""

    num_drafts: float = 0.0
    num_draft_tokens: float = 0.0
    num_accepted_tokens: float = 0.0
    accepted_per_pos: tuple[float, ...] = ()  # index = position in the draft


@dataclass(frozen=True)
class SpecDecodeSummary:
    """What speculative decoding did during one benchmark run (differences of two snapshots)."""

    num_drafts: int  # verify passes that carried draft tokens
    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_rate: float  # accepted / draft tokens
    mean_accepted_length: float  # 1 + accepted / drafts: tokens per verify pass (vLLM's definition)
    accepted_per_pos_rates: tuple[float, ...]  # accepted at position i / num_drafts

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpecDecodeSummary:
        return cls(**{**data, "accepted_per_pos_rates": tuple(data["accepted_per_pos_rates"])})


def parse_spec_decode_counters(text: str) -> SpecDecodeCounters | None:
    """Spec-decode counters in a Prometheus text exposition; None when it has none of them.

    Samples are matched by their full name (with `_total`) rather than by family name, because
    the parser only strips `_total` from the family when a `# TYPE ... counter` line is present.
    """
    totals = {_DRAFTS: 0.0, _DRAFT_TOKENS: 0.0, _ACCEPTED: 0.0}
    per_pos: dict[int, float] = {}
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            prefix = next((p for p in PREFIXES if sample.name.startswith(p)), None)
            if prefix is None:
                continue
            name = sample.name[len(prefix) :]
            if name in totals:
                totals[name] += sample.value
                found = True
            elif name == _ACCEPTED_PER_POS and "position" in sample.labels:
                pos = int(sample.labels["position"])
                per_pos[pos] = per_pos.get(pos, 0.0) + sample.value
                found = True
    if not found:
        return None
    num_positions = max(per_pos, default=-1) + 1
    return SpecDecodeCounters(
        num_drafts=totals[_DRAFTS],
        num_draft_tokens=totals[_DRAFT_TOKENS],
        num_accepted_tokens=totals[_ACCEPTED],
        accepted_per_pos=tuple(per_pos.get(i, 0.0) for i in range(num_positions)),
    )


async def fetch_spec_decode_counters(
    root_url: str, api_key: str | None = None, timeout_s: float = 5.0
) -> SpecDecodeCounters | None:
    """Snapshot of GET {root_url}/metrics; None when the server has no such endpoint or counters."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
            resp = await client.get(f"{root_url}/metrics", headers=headers)
        if resp.status_code != 200:
            return None
        return parse_spec_decode_counters(resp.text)
    except Exception:  # an optional side channel must never fail the benchmark
        return None


def spec_decode_summary(
    before: SpecDecodeCounters | None, after: SpecDecodeCounters | None
) -> SpecDecodeSummary | None:
    """The run's share of the counters; None without both snapshots or when nothing was drafted.

    A counter that went down means the server restarted mid-run, so the difference is meaningless
    and no summary is given.
    """
    if before is None or after is None:
        return None
    num_drafts = after.num_drafts - before.num_drafts
    num_draft_tokens = after.num_draft_tokens - before.num_draft_tokens
    num_accepted = after.num_accepted_tokens - before.num_accepted_tokens
    if num_drafts <= 0 or num_draft_tokens <= 0 or num_accepted < 0:
        return None
    # A position first accepted during the run is missing from `before`; it counted zero then.
    num_positions = max(len(before.accepted_per_pos), len(after.accepted_per_pos))
    per_pos = [
        _at(after.accepted_per_pos, i) - _at(before.accepted_per_pos, i)
        for i in range(num_positions)
    ]
    return SpecDecodeSummary(
        num_drafts=round(num_drafts),
        num_draft_tokens=round(num_draft_tokens),
        num_accepted_tokens=round(num_accepted),
        acceptance_rate=num_accepted / num_draft_tokens,
        mean_accepted_length=1.0 + num_accepted / num_drafts,
        accepted_per_pos_rates=tuple(n / num_drafts for n in per_pos),
    )


def _at(values: tuple[float, ...], i: int) -> float:
    return values[i] if i < len(values) else 0.0


def parse_engine_layout(text: str) -> dict[str, str] | None:
    """The labels of `pagoda:engine_config_info` in a Prometheus text exposition, if any."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pagoda:engine_config_info":
                return dict(sample.labels)
    return None


async def fetch_engine_layout(root_url: str, api_key: str | None = None,
                              timeout_s: float = 5.0) -> dict[str, str] | None:
    """The server's engine layout from GET {root_url}/metrics; None when it does not say."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
            resp = await client.get(f"{root_url}/metrics", headers=headers)
        return parse_engine_layout(resp.text) if resp.status_code == 200 else None
    except Exception:  # an optional side channel must never fail the benchmark
        return None
