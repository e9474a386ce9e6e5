"""`pagoda bench serve` against the fake OpenAI-compatible server in fake_server.py."""

from __future__ import annotations

import json
import os
import socket
import statistics

import pytest

from pagoda.bench.report import BenchResult
from pagoda.bench.runner import LoadConfig, arrival_gaps
from pagoda.bench.server_metrics import SpecDecodeSummary
from pagoda.cli.main import main
from tests.bench.fake_server import SPEC_PER_REQUEST, FakeBehavior, FakeServer, encode


def run_bench(tmp_path, url: str, *extra: str) -> tuple[int, BenchResult | None]:
    out = tmp_path / "run.json"
    argv = ["bench", "serve", "--base-url", url, "--disable-tqdm", "--save-result", str(out)]
    rc = main(argv + list(extra))
    return rc, BenchResult.load(out) if out.exists() else None


def assert_ordered(stats) -> None:
    assert stats.min <= stats.median <= stats.p95 <= stats.p99 <= stats.max
    assert stats.min <= stats.mean <= stats.max


def test_numbers_are_consistent_with_the_server(tmp_path):
    # 3 tokens per SSE chunk: token counts must come from `usage`, not from counting chunks.
    # Slow tokens keep all four admitted requests streaming at once even on a loaded machine.
    behavior = FakeBehavior(tokens_per_chunk=3, token_delay_s=0.02)
    with FakeServer(behavior) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "12", "--input-len", "40",
            "--output-len", "10", "--max-concurrency", "4", "--ignore-eos",
        )  # fmt: skip
    assert rc == 0 and result is not None
    s, records = result.summary, result.records
    assert result.tokenizer == "server:pagoda"
    assert result.settings["model"] == "fake-model"  # taken from GET /v1/models
    assert s.num_requests == s.completed + s.failed == len(records) == 12
    assert s.failed == 0
    assert len(behavior.bodies) == 12
    assert all(body["ignore_eos"] and body["stream"] for body in behavior.bodies)
    for record in records:
        assert record.usage_reported
        assert record.output_tokens == 10  # the server's usage.completion_tokens
        assert record.num_chunks == 4  # ceil(10 / 3)
        assert len(record.itl_s) == record.num_chunks - 1
        assert record.prompt_len == record.server_prompt_tokens == 40
        assert record.ttft_s <= record.e2e_s
        assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 9)
    assert s.total_output_tokens == sum(r.output_tokens for r in records) == 120
    assert s.total_input_tokens == 12 * 40
    assert s.output_throughput == pytest.approx(120 / s.duration_s)
    assert s.peak_concurrency == 4 == behavior.peak_in_flight
    for stats in (s.ttft_ms, s.tpot_ms, s.itl_ms, s.e2e_ms):
        assert_ordered(stats)
    assert s.itl_ms.count == 12 * 3
    assert s.e2e_ms.median == pytest.approx(statistics.median(r.e2e_s * 1000 for r in records))


def test_failures_are_counted_not_raised(tmp_path):
    behavior = FakeBehavior(fail_every=3, stream_error_every=5)
    with FakeServer(behavior) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "15", "--input-len", "8", "--output-len", "6",
        )  # fmt: skip
    assert rc == 0 and result is not None
    # Requests are numbered by arrival at the server; which ones fail is fixed by that number.
    http_500 = [n for n in range(1, 16) if n % 3 == 0]
    broken = [n for n in range(1, 16) if n % 5 == 0 and n % 3 != 0]
    s = result.summary
    assert s.failed == len(http_500) + len(broken) == 7
    assert s.completed == 15 - 7
    assert sum(s.errors.values()) == s.failed
    assert any(e.startswith("HTTP 500") for e in s.errors)
    assert any("deliberate stream error" in e for e in s.errors)
    assert s.total_output_tokens == 6 * s.completed


def test_unreachable_server_gives_failed_requests(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once the socket closes
    rc, result = run_bench(
        tmp_path, f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "3",
        "--input-len", "5", "--output-len", "4",
    )  # fmt: skip
    # the run is reported and saved, and the exit code says nothing succeeded
    assert rc == 1 and result is not None
    assert result.tokenizer == "words"
    assert result.summary.failed == 3 and result.summary.completed == 0
    assert all("Connect" in r.error for r in result.records)


def test_llama_server_tokenizer_and_missing_usage(tmp_path):
    behavior = FakeBehavior(tokenize_style="llama", send_usage=False, tokens_per_chunk=2)
    with FakeServer(behavior) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "4", "--input-len", "33",
            "--output-len", "7", "--range-ratio", "0.5", "--seed", "3", "--max-concurrency", "1",
        )  # fmt: skip
    assert rc == 0 and result is not None
    assert result.tokenizer == "server:llama.cpp"
    lengths = []  # one request at a time: the server saw the bodies in request order
    for record, body in zip(result.records, behavior.bodies, strict=True):
        assert not record.usage_reported
        assert record.output_tokens == record.num_chunks == -(-body["max_tokens"] // 2)
        assert 16 <= record.prompt_len <= 50
        lengths.append(record.prompt_len)
    assert len(set(lengths)) > 1  # --range-ratio varies the lengths


def test_chat_file_and_shared_prefix(tmp_path):
    chat = tmp_path / "chats.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3})
        + "\n"
        + json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    )
    behavior = FakeBehavior()
    with FakeServer(behavior) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--endpoint", "chat", "--dataset", "chat-file",
            "--chat-file", str(chat), "--num-prompts", "3", "--output-len", "5",
            "--max-concurrency", "1",
        )  # fmt: skip
        assert rc == 0 and result is not None
        assert [r.output_tokens for r in result.records] == [3, 5, 3]
        assert behavior.bodies[1]["messages"][0] == {"role": "system", "content": "be brief"}
        behavior.bodies.clear()
        rc, result = run_bench(
            tmp_path, server.url, "--dataset", "shared-prefix", "--shared-prefix-len", "20",
            "--input-len", "30", "--num-prompts", "5", "--output-len", "2",
        )  # fmt: skip
    assert rc == 0 and result is not None
    prompts = [body["prompt"] for body in behavior.bodies]
    assert len(encode(os.path.commonprefix(prompts))) >= 20  # the shared 20-token prefix
    assert len(set(prompts)) == 5
    assert all(r.prompt_len == 30 for r in result.records)


def test_goodput(tmp_path):
    with FakeServer(FakeBehavior()) as server:
        _, loose = run_bench(
            tmp_path, server.url, "--num-prompts", "4", "--input-len", "5", "--output-len", "4",
            "--goodput", "ttft:60000", "tpot:60000",
        )  # fmt: skip
        _, strict = run_bench(
            tmp_path, server.url, "--num-prompts", "4", "--input-len", "5", "--output-len", "4",
            "--goodput", "ttft:0.001",
        )  # fmt: skip
    assert loose.summary.good_requests == 4
    assert loose.summary.goodput == pytest.approx(4 / loose.summary.duration_s)
    assert strict.summary.good_requests == 0 and strict.summary.goodput == 0
    assert main(["bench", "serve", "--goodput", "latency:5"]) == 2  # unknown SLO name


def test_arrivals_follow_the_request_rate():
    gaps = arrival_gaps(4000, LoadConfig(request_rate=20.0, seed=1))
    assert gaps[0] == 0
    assert statistics.fmean(gaps[1:]) == pytest.approx(1 / 20, rel=0.1)
    # Gamma shape k has coefficient of variation 1/sqrt(k): burstier below 1, smoother above.
    bursty = arrival_gaps(4000, LoadConfig(request_rate=20.0, burstiness=0.25, seed=1))[1:]
    smooth = arrival_gaps(4000, LoadConfig(request_rate=20.0, burstiness=4.0, seed=1))[1:]
    assert statistics.stdev(bursty) / statistics.fmean(bursty) == pytest.approx(2.0, rel=0.15)
    assert statistics.stdev(smooth) / statistics.fmean(smooth) == pytest.approx(0.5, rel=0.15)
    assert arrival_gaps(3, LoadConfig()) == [0.0, 0.0, 0.0]


def test_request_rate_spaces_the_sends(tmp_path):
    with FakeServer(FakeBehavior()) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "6", "--input-len", "4", "--output-len", "2",
            "--request-rate", "20", "--burstiness", "100", "--warmup", "2",
        )  # fmt: skip
    assert rc == 0 and result is not None
    starts = [r.start_s for r in result.records]
    assert starts == sorted(starts)
    # Nearly regular gaps of 50 ms: five gaps take about 0.25 s.
    assert 0.18 < starts[-1] - starts[0] < 1.0
    assert result.settings["warmup"] == 2 and len(result.records) == 6


@pytest.mark.parametrize("prefix", ["pagoda:", "vllm:"])
def test_spec_decode_section(tmp_path, capsys, prefix):
    # Each streamed request advances the fake's counters by 4 drafts, 12 draft tokens and
    # (4, 3, 1) accepted tokens by position; another model's counters stay fixed.
    with FakeServer(FakeBehavior(spec_metrics_prefix=prefix)) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "5", "--input-len", "6", "--output-len", "3",
        )  # fmt: skip
    assert rc == 0 and result is not None  # `result` went through the saved JSON
    assert SPEC_PER_REQUEST.accepted_per_pos == (4, 3, 1)
    assert result.spec_decode == SpecDecodeSummary(
        num_drafts=20,
        num_draft_tokens=60,
        num_accepted_tokens=40,
        acceptance_rate=pytest.approx(40 / 60),
        mean_accepted_length=pytest.approx(3.0),
        accepted_per_pos_rates=pytest.approx((1.0, 0.75, 0.25)),
    )
    report = capsys.readouterr().out
    rows = {line[:40].strip(): line[40:].strip() for line in report.splitlines()}
    assert "Speculative Decoding" in report
    assert rows["Drafts:"] == "20"
    assert rows["Draft tokens:"] == "60"
    assert rows["Accepted tokens:"] == "40"
    assert rows["Acceptance rate (%):"] == "66.67"
    assert rows["Mean accepted length (tok/pass):"] == "3.00"
    assert rows["Position 0 acceptance (%):"] == "100.00"
    assert rows["Position 1 acceptance (%):"] == "75.00"
    assert rows["Position 2 acceptance (%):"] == "25.00"


def test_no_spec_decode_section_without_drafts(tmp_path, capsys):
    with FakeServer(FakeBehavior()) as server:  # no /metrics at all, as with llama-server
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
        )  # fmt: skip
    assert rc == 0 and result is not None and result.spec_decode is None
    # Counters present but nothing drafted during the run (every request fails).
    with FakeServer(FakeBehavior(spec_metrics_prefix="pagoda:", fail_every=1)) as server:
        rc, result = run_bench(
            tmp_path, server.url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
        )  # fmt: skip
    assert rc == 1 and result is not None and result.spec_decode is None  # all failed
    assert "Speculative" not in capsys.readouterr().out


def test_results_saved_before_spec_decode_still_load(tmp_path):
    with FakeServer(FakeBehavior(spec_metrics_prefix="pagoda:")) as server:
        _, result = run_bench(
            tmp_path, server.url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
        )  # fmt: skip
    assert result is not None and result.spec_decode is not None
    resaved = tmp_path / "resaved.json"
    result.save(resaved)
    assert BenchResult.load(resaved).to_json() == result.to_json()
    old = result.to_json()
    del old["spec_decode"]
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    loaded = BenchResult.load(old_path)
    assert loaded.spec_decode is None and loaded.summary == result.summary
