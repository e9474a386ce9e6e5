"""`pagoda capacity --bench ...`: replicas for a target rate within SLOs, from measured load
points of one replica (synthetic `bench serve` result files with known latencies)."""

from __future__ import annotations

import pytest

from pagoda.bench.deployment import load_points, plan_deployment, plan_layouts
from pagoda.bench.metrics import LatencyStats, Summary
from pagoda.bench.report import BenchResult
from pagoda.cli.main import main


def stats(ms: float) -> LatencyStats:
    return LatencyStats(count=10, mean=ms, std=0.0, min=ms, median=ms / 2, p95=ms, p99=ms,
                        max=ms)


def result_file(tmp_path, name: str, rate: float, ttft: float, tpot: float, failed: int = 0,
                output_len: int = 64, layout: tuple[int, int, int] | None = None) -> str:
    summary = Summary(num_requests=10, completed=10 - failed, failed=failed, duration_s=10.0,
                      total_input_tokens=1280, total_output_tokens=640,
                      request_throughput=rate, output_throughput=rate * output_len,
                      total_token_throughput=rate * 192, peak_concurrency=int(rate * 4) + 1,
                      ttft_ms=stats(ttft), tpot_ms=stats(tpot), itl_ms=stats(tpot),
                      e2e_ms=stats(ttft + 63 * tpot))
    settings = {"dataset": "random", "input_len": 128, "output_len": output_len}
    if layout is not None:  # what `bench serve` records from pagoda:engine_config_info
        tp, pp, threads = layout
        settings["server_layout"] = {"tensor_parallel_size": str(tp),
                                     "pipeline_parallel_size": str(pp),
                                     "num_threads": str(threads)}
    path = tmp_path / name
    BenchResult(settings, "server:pagoda", summary).save(path)
    return str(path)


@pytest.fixture
def sweep(tmp_path):
    return [result_file(tmp_path, "c1.json", 0.5, 200, 20),
            result_file(tmp_path, "c4.json", 1.8, 400, 35),
            result_file(tmp_path, "c16.json", 3.0, 1500, 90)]


def test_capacity_is_the_best_measured_point_within_the_slos(sweep):
    points = load_points(sweep, "p99")
    plan = plan_deployment(points, target_rate=10, slos_ms={"ttft": 1000, "tpot": 50})
    assert plan.capacity == 1.8 and plan.at.source == "c4.json"
    assert plan.replicas == 7  # ceil(10 / (1.8 * 0.8)) = ceil(6.94)
    assert plan.machines == 7
    looser = plan_deployment(points, 10, {"ttft": 2000, "tpot": 100}, headroom=1.0,
                             replicas_per_machine=2)
    assert (looser.capacity, looser.replicas, looser.machines) == (3.0, 4, 2)


def test_percentile_and_failures_count(sweep, tmp_path):
    # medians are half the p99s here: the c16 point meets ttft 1000 at the median
    assert plan_deployment(load_points(sweep, "median"), 3, {"ttft": 1000}).capacity == 3.0
    failing = result_file(tmp_path, "c8.json", 2.5, 300, 30, failed=1)
    plan = plan_deployment(load_points(sweep + [failing], "p99"), 3, {"ttft": 1000})
    assert plan.capacity == 1.8  # the faster point lost requests: it does not count


def test_refusals(sweep, tmp_path):
    points = load_points(sweep, "p99")
    with pytest.raises(ValueError, match=r"even the lightest \(0.50 req/s, c1.json\) has ttft"):
        plan_deployment(points, 5, {"ttft": 100})
    with pytest.raises(ValueError, match="at least one SLO"):
        plan_deployment(points, 5, {})
    with pytest.raises(ValueError, match="target rate must be positive"):
        plan_deployment(points, 0, {"ttft": 1000})
    other = result_file(tmp_path, "long.json", 1.0, 300, 30, output_len=512)
    with pytest.raises(ValueError, match="different workloads"):
        load_points(sweep + [other], "p99")


def test_cli_prints_the_plan_and_refuses_in_one_line(sweep, capsys):
    assert main(["capacity", "--bench", *sweep, "--target-rate", "10",
                 "--slo", "ttft:1000", "tpot:50"]) == 0
    out = capsys.readouterr().out
    assert "one replica sustains 1.80 req/s" in out
    assert "-> 7 replica(s) of layout not recorded on 7 machine(s)" in out
    assert "misses: ttft 1500 ms > 1000 ms; tpot 90 ms > 50 ms  (c16.json)" in out
    assert main(["capacity", "--bench", *sweep]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--bench needs --target-rate" in err
    assert main(["capacity", "--bench", "/nonexistent.json", "--target-rate", "1",
                 "--slo", "ttft:1"]) != 0
    assert "no such result file" in capsys.readouterr().err


def test_layouts_are_planned_apart_and_the_fewest_cores_win(tmp_path, capsys):
    """One process of 2 threads at 1.8 req/s against TP=2 of 4 threads at 3.0: for 10 req/s
    7 x 2 = 14 cores beat 5 x 4 = 20; a layout wider than a machine spans machines."""
    files = [result_file(tmp_path, "a1.json", 0.5, 200, 20, layout=(1, 1, 2)),
             result_file(tmp_path, "a4.json", 1.8, 400, 35, layout=(1, 1, 2)),
             result_file(tmp_path, "b4.json", 3.0, 400, 35, layout=(2, 1, 4)),
             result_file(tmp_path, "c4.json", 9.0, 400, 35, layout=(1, 2, 8))]
    points = load_points(files, "p99")
    best, plans = plan_layouts(points[:3], 10, {"ttft": 1000}, cores_per_machine=4)
    assert best.at.layout == "TP=1 x PP=1, 2 threads"
    assert (best.replicas, best.cores, best.machines) == (7, 14, 4)  # two per 4-core machine
    other = plans["TP=2 x PP=1, 4 threads"]
    assert (other.replicas, other.cores, other.machines) == (5, 20, 5)
    best, plans = plan_layouts(points, 10, {"ttft": 1000}, cores_per_machine=4)
    wide = plans["TP=1 x PP=2, 8 threads"]  # 8 threads on 4-core machines: two per replica
    assert (wide.replicas, wide.machines_per_replica, wide.machines, wide.cores) == (2, 2, 4, 16)
    assert best.at.layout == "TP=1 x PP=1, 2 threads"  # 14 cores still win
    best, plans = plan_layouts(points, 10, {"ttft": 1000}, cores_per_machine=8)
    assert plans["TP=1 x PP=2, 8 threads"].cores == 16  # 2 replicas x 8: still more than 14
    assert best.at.layout == "TP=1 x PP=1, 2 threads" and best.machines == 2
    assert main(["capacity", "--bench", *files, "--target-rate", "10", "--slo", "ttft:1000",
                 "--cores-per-machine", "4"]) == 0
    out = capsys.readouterr().out
    assert "TP=2 x PP=1, 4 threads: 3.00 req/s per replica -> 5 replica(s) on 5 machine(s), " \
        "20 cores" in out
    assert "-> 7 replica(s) of TP=1 x PP=1, 2 threads on 4 machine(s) (14 cores in all)" in out
    assert "TP=1 x PP=2, 8 threads: 9.00 req/s per replica -> 2 replica(s) on 4 machine(s), " \
        "16 cores; each replica over 2 machines (`--nnodes 2`" in out
