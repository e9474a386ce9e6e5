"""`pagoda cost` against hand-computed values."""

from __future__ import annotations

import json

import pytest

from pagoda.cli.main import main


@pytest.fixture
def run_json(tmp_path):
    path = tmp_path / "run.json"
    # 2,000 output tokens in 10 s -> 0.005 machine-seconds per token.
    path.write_text(json.dumps({"summary": {"duration_s": 10.0, "total_output_tokens": 2000}}))
    return path


def test_monthly_cost_from_a_measured_run(run_json, capsys):
    rc = main(
        ["cost", "--result", str(run_json), "--hourly-usd", "2.0",
         "--requests-per-month", "10e6", "--tokens-per-request", "500"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    # 10e6 × 500 × 0.005 × 2 / 3600 = 13,888.89; per million tokens 1e6 × 0.005 × 2 / 3600 = 2.7778
    assert "= $13,888.89" in out
    assert "= $2.7778" in out
    assert "requests/month × tokens/request × machine-seconds/token × $/hour / 3600" in out
    assert "10,000,000 × 500 × 0.005 × 2 / 3600" in out
    assert "10.000 s / 2,000 output tokens" in out


def test_given_seconds_per_token(capsys):
    rc = main(
        ["cost", "--seconds-per-token", "0.02", "--hourly-usd", "3.6",
         "--requests-per-month", "1000", "--tokens-per-request", "100"]
    )  # fmt: skip
    assert rc == 0
    assert "= $2.00" in capsys.readouterr().out  # 1000 × 100 × 0.02 × 3.6 / 3600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--result", "/nonexistent/run.json"], "no such result file"),
        (["--result", "RUN", "--hourly-usd=-1"], "--hourly-usd must not be negative"),
        (
            ["--result", "RUN", "--requests-per-month=-5"],
            "--requests-per-month must not be negative",
        ),
        (["--result", "BAD"], "is not a benchmark result"),
        (["--result", "EMPTY"], "no output tokens"),
        ([], "exactly one of --result"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, run_json, capsys, argv, message):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"summary": {"duration_s": 3.0, "total_output_tokens": 0}}))
    names = {"RUN": str(run_json), "BAD": str(bad), "EMPTY": str(empty)}
    argv = [names.get(a, a) for a in argv]
    defaults = ["--hourly-usd", "2", "--requests-per-month", "10", "--tokens-per-request", "5"]
    rc = main(["cost", *defaults, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and "\n" not in err
