"""`pagoda capacity --bench ...`: how many replicas serve a target request rate within latency
SLOs, planned from measured runs of one replica rather than from a model of the hardware.

Input: `pagoda bench serve` results of one replica at several loads (what `pagoda bench sweep`
saves), all with the workload the deployment will see. A load point *meets* the SLOs when its
chosen percentile of every named metric (TTFT, TPOT, E2E) is within its limit and no request
failed. The replica's capacity is the highest measured request rate among those points — never
extrapolated past the measurements — and the plan is

    replicas = ceil(target_rate / (capacity * headroom))
    machines = ceil(replicas / replicas_per_machine)

`headroom` (default 0.8) keeps each replica below the load where it was measured to just meet the
SLOs, for bursts and for a replica lost.

A replica may itself be several processes (tensor or pipeline parallelism). `pagoda bench serve`
records the server's layout (`pagoda:engine_config_info`: TP, PP, threads); results of several
layouts are planned layout by layout, and the plan chosen is the one using the fewest cores in
all (replicas x threads per replica), then the fewest machines. With `cores_per_machine`, a
machine holds as many replicas as its cores allow; a replica needing more cores than a machine
has spans ceil(threads / cores_per_machine) machines, its ranks started with `--nnodes` (the
measured point must then come from such a multi-machine run: ranks on one machine and ranks
talking over a network are not the same speed, and this planner does not guess the difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pagoda.bench.metrics import LatencyStats, Summary
from pagoda.bench.report import BenchResult

PERCENTILES = ("median", "p95", "p99")


@dataclass(frozen=True)
class LoadPoint:
    source: str  # the result file
    request_rate: float  # measured completed requests / s
    output_throughput: float
    concurrency: int  # peak requests in flight
    latencies_ms: dict[str, float]  # metric -> its percentile
    failed: int
    layout: str = "layout not recorded"  # e.g. "TP=2 x PP=1, 4 threads"
    threads: int | None = None  # cores one replica uses (all its ranks), when recorded

    def misses(self, slos_ms: dict[str, float]) -> list[str]:
        """The SLOs this point misses, as readable reasons (empty: it meets them all)."""
        out = [f"{self.failed} failed requests"] if self.failed else []
        out += [f"{name} {self.latencies_ms[name]:.0f} ms > {limit:.0f} ms"
                for name, limit in slos_ms.items() if self.latencies_ms[name] > limit]
        return out


@dataclass(frozen=True)
class DeploymentPlan:
    target_rate: float
    capacity: float  # request rate one replica sustains within the SLOs (measured)
    headroom: float
    replicas: int
    machines: int
    at: LoadPoint  # the measured point the capacity comes from
    machines_per_replica: int = 1  # > 1: each replica's ranks span machines (--nnodes)

    @property
    def cores(self) -> int | None:
        return None if self.at.threads is None else self.replicas * self.at.threads


def load_point(result: BenchResult, source: str, percentile: str) -> LoadPoint:
    s: Summary = result.summary
    stats: dict[str, LatencyStats] = {"ttft": s.ttft_ms, "tpot": s.tpot_ms, "e2e": s.e2e_ms}
    layout, threads = "layout not recorded", None
    recorded = result.settings.get("server_layout") or {}
    if recorded:
        threads = int(recorded.get("num_threads", 0)) or None
        layout = (f"TP={recorded.get('tensor_parallel_size', '?')} x "
                  f"PP={recorded.get('pipeline_parallel_size', '?')}, {threads} threads")
    return LoadPoint(source, s.request_throughput, s.output_throughput, s.peak_concurrency,
                     {name: getattr(st, percentile) for name, st in stats.items()}, s.failed,
                     layout, threads)


def load_points(paths: list[str], percentile: str) -> list[LoadPoint]:
    if percentile not in PERCENTILES:
        raise ValueError(f"percentile must be one of {PERCENTILES}")
    results = [BenchResult.load(p) for p in paths]
    points = [load_point(r, Path(p).name, percentile) for r, p in zip(results, paths, strict=True)]
    workloads = {_workload(r) for r in results}
    if len(workloads) > 1:
        raise ValueError("the results measure different workloads (dataset, input or output "
                         f"lengths): {sorted(workloads)}; plan from runs of one workload")
    return sorted(points, key=lambda p: p.request_rate)


def _workload(result: BenchResult) -> str:
    st = result.settings
    return f"{st.get('dataset')} {st.get('input_len')} in / {st.get('output_len')} out"


def plan_layouts(points: list[LoadPoint], target_rate: float, slos_ms: dict[str, float],
                 headroom: float = 0.8, replicas_per_machine: int = 1,
                 cores_per_machine: int | None = None
                 ) -> tuple[DeploymentPlan, dict[str, DeploymentPlan | str]]:
    """A plan per measured layout (or why it has none) and the cheapest of them."""
    layouts: dict[str, list[LoadPoint]] = {}
    for p in points:
        layouts.setdefault(p.layout, []).append(p)
    plans: dict[str, DeploymentPlan | str] = {}
    for layout, group in layouts.items():
        per_machine, span = replicas_per_machine, 1
        threads = group[0].threads
        if cores_per_machine is not None and threads is not None:
            per_machine = cores_per_machine // threads
            if per_machine < 1:  # the replica's ranks span machines
                per_machine, span = 1, -(-threads // cores_per_machine)
        try:
            plans[layout] = plan_deployment(group, target_rate, slos_ms, headroom, per_machine,
                                            span)
        except ValueError as exc:
            if len(layouts) == 1:
                raise
            plans[layout] = str(exc)
    feasible = [p for p in plans.values() if isinstance(p, DeploymentPlan)]
    if not feasible:
        raise ValueError("no measured layout can be planned: " + "; ".join(
            f"{layout}: {why}" for layout, why in plans.items()))
    best = min(feasible, key=lambda p: (p.cores if p.cores is not None else p.replicas,
                                        p.machines, p.replicas))
    return best, plans


def plan_deployment(points: list[LoadPoint], target_rate: float, slos_ms: dict[str, float],
                    headroom: float = 0.8, replicas_per_machine: int = 1,
                    machines_per_replica: int = 1) -> DeploymentPlan:
    """The plan for replicas of one layout, measured at `points`; a replica takes
    `machines_per_replica` whole machines when its ranks span several (then one per machine)."""
    if replicas_per_machine > 1 and machines_per_replica > 1:
        raise ValueError("a replica spanning machines leaves no room for another beside it")
    if (target_rate <= 0 or not 0 < headroom <= 1 or replicas_per_machine < 1
            or machines_per_replica < 1):
        raise ValueError("target rate must be positive, headroom in (0, 1], replicas per "
                         "machine at least 1")
    if not slos_ms:
        raise ValueError("give at least one SLO (--slo ttft:MS, tpot:MS or e2e:MS)")
    if not points:
        raise ValueError("no measured load points")
    meeting = [p for p in points if not p.misses(slos_ms)]
    if not meeting:
        lightest = points[0]
        raise ValueError(f"no measured load meets the SLOs: even the lightest "
                         f"({lightest.request_rate:.2f} req/s, {lightest.source}) has "
                         f"{'; '.join(lightest.misses(slos_ms))}. Measure lighter loads, relax "
                         "the SLOs, or make one replica faster")
    best = max(meeting, key=lambda p: p.request_rate)
    replicas = math.ceil(target_rate / (best.request_rate * headroom))
    machines = math.ceil(replicas / replicas_per_machine) * machines_per_replica
    return DeploymentPlan(target_rate, best.request_rate, headroom, replicas, machines, best,
                          machines_per_replica)


def format_plan(plan: DeploymentPlan, points: list[LoadPoint], slos_ms: dict[str, float],
                percentile: str, plans: dict[str, DeploymentPlan | str] | None = None) -> str:
    slo_text = ", ".join(f"{k} {percentile} <= {v:.0f} ms" for k, v in slos_ms.items())
    lines = [f"deployment plan for {plan.target_rate:g} req/s with {slo_text}:",
             "  measured load points (one replica each):"]
    for p in sorted(points, key=lambda p: (p.layout, p.request_rate)):
        verdict = "meets" if not p.misses(slos_ms) else "misses: " + "; ".join(p.misses(slos_ms))
        lines.append(f"    {p.layout}: {p.request_rate:7.2f} req/s  {p.output_throughput:8.1f} "
                     f"out tok/s  concurrency {p.concurrency:3d}  {verdict}  ({p.source})")
    if plans and len(plans) > 1:
        lines.append("  per layout:")
        for layout, other in plans.items():
            if isinstance(other, str):
                lines.append(f"    {layout}: not planned: {other}")
            else:
                cores = "" if other.cores is None else f", {other.cores} cores"
                lines.append(f"    {layout}: {other.capacity:.2f} req/s per replica -> "
                             f"{other.replicas} replica(s) on {other.machines} machine(s){cores}"
                             f"{_span(other)}")
    cores = "" if plan.cores is None else f" ({plan.cores} cores in all)"
    lines += [
        f"  one replica sustains {plan.capacity:.2f} req/s within the SLOs "
        f"(measured at concurrency {plan.at.concurrency}; {plan.at.layout})",
        f"  planned at {plan.headroom:.0%} of that: {plan.capacity * plan.headroom:.2f} req/s "
        "per replica",
        f"  -> {plan.replicas} replica(s) of {plan.at.layout} on {plan.machines} "
        f"machine(s){cores}{_span(plan)}",
    ]
    return "\n".join(lines)


def _span(plan: DeploymentPlan) -> str:
    n = plan.machines_per_replica
    return "" if n == 1 else (f"; each replica over {n} machines (`--nnodes {n}`, "
                              "capacity as measured for that layout)")
