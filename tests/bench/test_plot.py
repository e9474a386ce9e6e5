"""`pagoda bench plot` and `pagoda bench sweep` write real PNG files."""

from __future__ import annotations

import json

import matplotlib.image

from pagoda.cli.main import main
from tests.bench.fake_server import FakeBehavior, FakeServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 600 and height > 300


def test_sweep_saves_each_run_and_plots(tmp_path, capsys):
    out = tmp_path / "sweep"
    with FakeServer(FakeBehavior()) as server:
        rc = main(
            ["bench", "sweep", "--base-url", server.url, "--concurrency", "1,3", "--num-prompts",
             "6", "--input-len", "6", "--output-len", "5", "--disable-tqdm", "--out", str(out)]
        )  # fmt: skip
    assert rc == 0
    runs = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(runs) == {"sweep_c1.json", "sweep_c3.json"}
    assert runs["sweep_c1.json"]["summary"]["peak_concurrency"] == 1
    assert runs["sweep_c3.json"]["summary"]["peak_concurrency"] == 3
    assert runs["sweep_c3.json"]["settings"]["max_concurrency"] == 3
    assert_png(out / "latency_cdf.png")
    assert_png(out / "throughput_latency.png")
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_plot_rate_runs(tmp_path):
    paths = []
    with FakeServer(FakeBehavior()) as server:
        for rate in ("50", "inf"):
            path = tmp_path / f"run_{rate}.json"
            rc = main(
                ["bench", "serve", "--base-url", server.url, "--request-rate", rate,
                 "--num-prompts", "4", "--input-len", "4", "--output-len", "3", "--disable-tqdm",
                 "--save-result", str(path)]
            )  # fmt: skip
            assert rc == 0
            paths.append(str(path))
    out = tmp_path / "plots"
    assert main(["bench", "plot", *paths, "--out", str(out)]) == 0
    assert_png(out / "latency_cdf.png")
    assert_png(out / "throughput_latency.png")


def test_plot_rejects_a_missing_file(tmp_path, capsys):
    assert main(["bench", "plot", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "no such result file" in capsys.readouterr().err
