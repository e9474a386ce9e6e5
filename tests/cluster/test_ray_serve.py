"""`pagoda ray-serve` on a local Ray instance: the OpenAI app as a Ray Serve application that
autoscales from one replica to two under sustained load, answers the `openai` client (JSON and
SSE) from both, and replaces a replica SIGKILLed under load while its non-streaming requests
still succeed. The tests run in order on one app (one Ray start, ~30 s)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.gateway_harness import (
    KEY_ALICE,
    GatewayServer,
    free_port,
    make_config,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_app():
    port = free_port()
    pagoda = Path(sys.executable).with_name("pagoda")
    proc = subprocess.Popen(
        [str(pagoda), "ray-serve", "--port", str(port), "--num-replicas", "auto",
         "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
         "--ray-num-cpus", "2", "--threads", "1", "--kv-cache-memory", str(64 << 20),
         "--served-model-name", "m", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"pagoda ray-serve exited with {proc.returncode}"
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=300, interval=1.0)
        yield url
    finally:
        proc.terminate()  # SIGTERM: Serve drains the replicas, then Ray stops
        try:
            assert proc.wait(timeout=90) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


class Load:
    """Clients sending non-streaming completions until stopped; records each answer's
    (time, status, replica)."""

    def __init__(self, url: str, num_clients: int, max_retries: int = 0) -> None:
        self.answers: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(url, i, max_retries),
                                         daemon=True) for i in range(num_clients)]

    def _client(self, url: str, i: int, max_retries: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=max_retries,
                               timeout=120)
        n = 0
        while not self.stop.is_set():
            try:
                raw = client.completions.with_raw_response.create(
                    model="m", prompt=f"Client {i} request {n}: rivers",
                    max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                answer = (raw.http_response.status_code, raw.headers.get("x-pagoda-replica", ""))
            except openai.APIStatusError as exc:
                answer = (exc.status_code, "")
            except openai.APIConnectionError:
                answer = (0, "")
            self.answers.append((time.monotonic(), *answer))
            n += 1

    def replicas(self, since: float = 0.0) -> set[str]:
        return {r for t, _, r in self.answers if t >= since}

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:pagoda"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_autoscales_from_one_replica_to_two_under_load(ray_app):
    client = openai.OpenAI(base_url=ray_app + "/v1", api_key="none", max_retries=0)
    quiet = {client.completions.with_raw_response.create(
        model="m", prompt="Hello", max_tokens=2).headers["x-pagoda-replica"]
        for _ in range(4)}
    assert len(quiet) == 1  # min_replicas
    start = time.monotonic()
    with Load(ray_app, num_clients=6) as load:
        wait_for(lambda: len(load.replicas()) == 2, timeout=120, interval=0.5)
        scaled_after = time.monotonic() - start
    print(f"autoscaled 1 -> 2 replicas after {scaled_after:.1f} s of 6 concurrent clients")
    assert {status for _, status, _ in load.answers} == {200}


def test_both_replicas_answer_the_openai_client(ray_app):
    client = openai.OpenAI(base_url=ray_app + "/v1", api_key="none", max_retries=0)

    def chat(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": f"Hi {i}"}],
            max_tokens=16, temperature=0)
        assert raw.parse().choices[0].message.content
        return raw.headers["x-pagoda-replica"]

    with ThreadPoolExecutor(8) as pool:
        replicas = set(pool.map(chat, range(16)))
    assert len(replicas) == 2
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    # the Pagoda gateway takes the Ray Serve endpoint as an upstream (keys, limits, cache stay
    # in the gateway; Ray balances behind it)
    with GatewayServer(make_config({"m": [ray_app]}, cache={"enabled": False})) as gw:
        via = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_ALICE, max_retries=0)
        raw = via.completions.with_raw_response.create(model="m", prompt="Hello", max_tokens=3)
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].text
    assert raw.headers["x-pagoda-upstream"] == ray_app[len("http://"):]


def test_a_replica_killed_under_load_is_replaced_and_no_request_fails(ray_app):
    """Ray's proxy answers the requests in flight on the dead replica with a 500
    (RayActorError: Ray Serve never re-sends a request a replica may have acted on); the
    openai client's default retries (2, with backoff) re-send them to the survivor, so no
    request fails for the client."""
    pids = replica_pids()
    assert len(pids) == 2, pids
    with Load(ray_app, num_clients=6, max_retries=2) as load:
        wait_for(lambda: len(load.answers) >= 6, timeout=120)
        before = load.replicas()
        subprocess.run(["kill", "-9", str(pids[0])], check=True)
        killed = time.monotonic()
        # Ray's controller notices the dead actor and starts a replacement (a new replica id)
        wait_for(lambda: len(load.replicas(killed) - before) >= 1, timeout=180, interval=0.5)
        replaced_after = time.monotonic() - killed
    print(f"replacement replica answering {replaced_after:.1f} s after the SIGKILL")
    statuses = [status for _, status, _ in load.answers]
    assert statuses.count(200) == len(statuses), statuses
    assert len(replica_pids()) == 2
