"""Backpressure (503 + Retry-After), per-request timeout, and SIGTERM graceful shutdown, on a
server that runs one request at a time (`--max-num-seqs 1`) and admits two waiting ones."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.server_process import ServerProcess, serving

# The backpressure test reads the queue while one request runs, which must not have ended by
# then. Nothing here waits for this deadline (the test's requests end when their clients
# disconnect).
TIMEOUT_S = 300.0
# The deadline test has a server of its own whose deadline is short: it waits the deadline out
# twice (a stream, then a request queued behind it), which at TIMEOUT_S would take minutes.
SHORT_TIMEOUT_S = 6.0
# ~2,000 tokens (near the server's context limit): about a minute at fp32 batch-1 speed
LONG = {"prompt": "Write a long essay about rivers.", "max_tokens": 2000, "ignore_eos": True,
        "stream": True}


@pytest.fixture(scope="module")
def limited():
    proc = ServerProcess("--max-num-seqs", "1", "--max-waiting", "2", "--request-timeout",
                         str(TIMEOUT_S), "--shutdown-grace", "20")
    try:
        proc.wait_ready()
        with proc.client() as http:  # warm up, so the first test's timings are not a cold start
            http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def short_deadline():
    with serving("--max-num-seqs", "1", "--max-waiting", "2", "--request-timeout",
                 str(SHORT_TIMEOUT_S)) as proc:
        with proc.client() as http:  # warm up: a cold first step must not eat the deadline
            http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        yield proc


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def finished_counts(server: ServerProcess) -> list[str]:
    """The server's finished-request counters (which requests ended, and why)."""
    with server.client() as http:
        return [line for line in http.get("/metrics").text.splitlines()
                if line.startswith("pagoda:request_success_total")]


def test_backpressure_503_with_retry_after(limited):
    """One request runs; four more arrive at once: two wait, two are refused with 503."""
    outcomes: list[httpx.Response] = []
    arrive = threading.Barrier(4)
    release = threading.Event()

    def request(i: int) -> None:
        path, body = ("/v1/completions", LONG) if i % 2 else ("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True})
        with limited.client() as client:
            arrive.wait()
            with contextlib.suppress(httpx.HTTPError), client.stream("POST", path,
                                                                     json=body) as r:
                if r.status_code != 200:
                    r.read()
                outcomes.append(r)
                if r.status_code == 200:
                    release.wait(60)  # stay queued until every outcome is known

    with limited.client() as http, http.stream("POST", "/v1/completions", json=LONG) as running:
        assert running.status_code == 200
        # `lines` stays referenced until the end: dropping the last reference to a response's
        # line iterator closes httpcore's stream, i.e. the connection, and the server aborts the
        # running request (a waiter then starts: this test's old flake, num_pending 1)
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        threads = [threading.Thread(target=request, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) == 4, timeout=20)
        queue = limited.kv()
        release.set()
        for t in threads:
            t.join(30)
    codes = sorted(r.status_code for r in outcomes)
    assert codes == [200, 200, 503, 503], [(r.status_code, r.text) for r in outcomes]
    assert queue["num_pending"] == 2, (queue, finished_counts(limited), limited.log_tail())
    for r in outcomes:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_overloaded"
    # every connection is closed: the queue drains and the blocks come back
    kv = limited.wait_all_blocks_free(timeout=90)
    assert kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_pending"] == 0
    with limited.client() as http:
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}) \
            .status_code == 200


def test_a_batch_larger_than_the_queue_is_taken_whole_when_nothing_waits(limited):
    """Five prompts against --max-waiting 2: one ticket at a time they could never all get in,
    and a 503 would repeat for ever on retry; with nothing waiting the batch enters whole."""
    with limited.client() as http:
        got = http.post("/v1/completions", json={"prompt": ["hi"] * 5, "max_tokens": 2})
    assert got.status_code == 200, got.text
    assert sorted(c["index"] for c in got.json()["choices"]) == [0, 1, 2, 3, 4]
    assert limited.kv()["num_pending"] == 0


def test_timeout_streaming_and_non_streaming(short_deadline):
    """A streaming request times out with an error chunk; a non-streaming one queued behind it
    times out with a 504 (the deadline counts from arrival, queueing included)."""
    result: dict[str, httpx.Response] = {}

    def non_streaming() -> None:
        with short_deadline.client() as http:
            result["r"] = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long essay."}],
                "max_tokens": 2000, "ignore_eos": True})

    start = time.monotonic()
    with short_deadline.client() as http, http.stream("POST", "/v1/completions", json=LONG) as r:
        lines = r.iter_lines()
        events = [next(line for line in lines if line.startswith("data: {"))[len("data: "):]]
        waiter = threading.Thread(target=non_streaming)
        waiter.start()
        events += [line[len("data: "):] for line in lines if line.startswith("data: ")]
    elapsed = time.monotonic() - start
    assert SHORT_TIMEOUT_S <= elapsed < SHORT_TIMEOUT_S + 10
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert len(events) > 3  # tokens were streamed before the deadline
    waiter.join(3 * SHORT_TIMEOUT_S)
    assert result["r"].status_code == 504
    assert result["r"].json()["error"]["code"] == "request_timeout"
    kv = short_deadline.wait_all_blocks_free(timeout=5)
    assert kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_waiting"] == 0


def test_sigterm_drains_in_flight_requests_then_exits_0(limited):
    """Runs last in this module: it stops the server."""
    with limited.client() as http, http.stream("POST", "/v1/completions", json={
            **LONG, "max_tokens": 24, "temperature": 0}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        limited.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(limited.url), timeout=10)  # no new connections
        rest = [line for line in lines if line.startswith("data: ")]
    chunks = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks for _ in c["choices"]) >= 2
    assert limited.proc.wait(30) == 0


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False
