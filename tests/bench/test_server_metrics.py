"""Parsing and differencing the server's speculative-decoding counters (bench/server_metrics.py)."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from pagoda.bench.server_metrics import (
    SpecDecodeCounters,
    SpecDecodeSummary,
    fetch_spec_decode_counters,
    parse_spec_decode_counters,
    spec_decode_summary,
)
from tests.bench.fake_server import FakeBehavior, FakeServer


def test_reads_the_names_the_pagoda_server_exports():
    # Rendered by the server's own collector, so a renamed counter there breaks this test.
    from pagoda.engine.llm_engine import EngineStats
    from pagoda.server.metrics import ServerMetrics

    stats = EngineStats(
        num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_blocks=0, num_preemptions=0,
        prefix_cache_queries=0, prefix_cache_hits=0, spec_num_drafts=10,
        spec_num_draft_tokens=30, spec_num_accepted_tokens=17, spec_accepted_per_pos=(9, 6, 2),
    )  # fmt: skip
    llm = SimpleNamespace(stats=lambda: stats)
    text = ServerMetrics(lambda: llm, lambda: "m").render().decode()
    assert parse_spec_decode_counters(text) == SpecDecodeCounters(10, 30, 17, (9, 6, 2))


def test_vllm_prefix_sums_models_and_ignores_created_samples():
    text = "\n".join([
        'vllm:spec_decode_num_drafts_total{model_name="a"} 4.0',
        'vllm:spec_decode_num_drafts_total{model_name="b"} 6.0',
        'vllm:spec_decode_num_drafts_created{model_name="a"} 1.7e9',
        'vllm:spec_decode_num_draft_tokens_total{model_name="a"} 20.0',
        'vllm:spec_decode_num_accepted_tokens_total{model_name="a"} 9.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="a",position="1"} 3.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="b",position="0"} 6.0',
        'vllm:num_requests_running{model_name="a"} 2.0',
    ]) + "\n"  # fmt: skip
    # No `# TYPE` lines: the samples keep `_total` in their family names; position 2 is absent.
    assert parse_spec_decode_counters(text) == SpecDecodeCounters(10, 20, 9, (6, 3))
    assert parse_spec_decode_counters("llamacpp:tokens_predicted_total 5\n") is None


def test_summary_is_the_difference_of_two_snapshots():
    before = SpecDecodeCounters(10, 30, 12, (8, 4))
    after = SpecDecodeCounters(30, 90, 52, (26, 18, 8))  # a third position appeared mid-run
    spec = spec_decode_summary(before, after)
    assert spec is not None
    assert (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) == (20, 60, 40)
    assert spec.acceptance_rate == pytest.approx(40 / 60)
    assert spec.mean_accepted_length == pytest.approx(1 + 40 / 20)
    assert spec.accepted_per_pos_rates == pytest.approx((18 / 20, 14 / 20, 8 / 20))
    assert SpecDecodeSummary.from_json(spec.to_json()) == spec
    assert spec_decode_summary(None, after) is None
    assert spec_decode_summary(before, None) is None
    assert spec_decode_summary(after, after) is None  # no drafts during the run
    assert spec_decode_summary(after, before) is None  # counters went down: server restarted


def test_fetch_never_fails():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once the socket closes
    assert asyncio.run(fetch_spec_decode_counters(f"http://127.0.0.1:{port}", timeout_s=1)) is None
    with FakeServer(FakeBehavior()) as server:  # no /metrics route: 404
        assert asyncio.run(fetch_spec_decode_counters(server.url)) is None
    with FakeServer(FakeBehavior(spec_metrics_prefix="pagoda:")) as server:
        counters = asyncio.run(fetch_spec_decode_counters(server.url))
    assert counters is not None and counters.num_drafts > 0
