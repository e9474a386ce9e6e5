"""`pagoda serve --tensor-parallel-size 2` and `--pipeline-parallel-size 2` end to end: the
openai client gets the same greedy text as a one-process engine; a rank killed under load fails
the requests in flight with an error and turns /health into 503 (never a hang); stopping the
server then stops every process it started."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from pagoda.bench.server_metrics import parse_engine_layout
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.server.server_process import ServerProcess

PROMPT = "The three primary colours are"


def parallel_workers(server: ServerProcess) -> list[psutil.Process]:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [p for p in children if "pagoda.parallel.worker" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def expected(make_engine, loaded_model) -> str:
    """One process's greedy text for PROMPT (both layouts' reference)."""
    expected_ids = run_to_completion(make_engine(), {"r": (
        loaded_model.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=16))})
    return loaded_model.tokenizer.decode(expected_ids["r"])


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_openai_client_and_a_killed_rank(flag, expected):
    # the file's blocks as the fp32 product, with an fp32 cache (tp_engine says why)
    srv = ServerProcess(flag, "2", "--served-model-name", "m", "--quant-kernel", "wgemm",
                        "--kv-cache-dtype", "fp32")
    try:
        srv.wait_ready()
        (worker,) = parallel_workers(srv)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0)
        got = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0)
        assert got.choices[0].text == expected
        layout = parse_engine_layout(httpx.get(srv.url + "/metrics", timeout=10).text)
        size = "tensor" if flag == "--tensor-parallel-size" else "pipeline"
        assert layout is not None and layout[f"{size}_parallel_size"] == "2"
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        result: dict[str, httpx.Response] = {}

        def long_request() -> None:
            with srv.client() as http:
                result["r"] = http.post("/v1/completions", json={
                    "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True})

        waiter = threading.Thread(target=long_request)
        waiter.start()
        while srv.kv()["num_running"] == 0:
            assert waiter.is_alive()
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        waiter.join(60)
        assert not waiter.is_alive(), "the request hung after its rank died"
        assert result["r"].status_code >= 500
        assert "rank 1" in result["r"].json()["error"]["message"] or "onnection" in \
            result["r"].json()["error"]["message"]
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        with srv.client() as http:
            assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    finally:
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        srv.stop()
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive
