"""A `pagoda ray-serve` app on a local Ray instance, and clients that load it (tests/cluster)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from tests.gateway.gateway_harness import free_port, wait_for


@contextlib.contextmanager
def ray_serve(*replica_args: str) -> Iterator[str]:
    """`pagoda ray-serve` (2 Ray CPUs, one thread per replica, unless `replica_args` say
    otherwise) until its /health answers 200;
    yields its URL, then SIGTERMs it (Serve drains the replicas) and expects exit 0."""
    port = free_port()
    pagoda = Path(sys.executable).with_name("pagoda")
    proc = subprocess.Popen(
        [str(pagoda), "ray-serve", "--port", str(port),
         "--ray-num-cpus", "2", "--threads", "1", "--kv-cache-memory", str(64 << 20),
         "--served-model-name", "m", "--log-level", "warning", *replica_args],  # args override
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
        proc.terminate()
        try:
            assert proc.wait(timeout=90) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def assert_one_process_greedy_text(url: str, make_engine: Callable, loaded_model) -> None:
    """Sixteen greedy completions through the app's two replicas equal one process's text, and
    both replicas answer some (different beginnings: different owners under the prefix router,
    so both own one with probability 1 - 2**-15)."""
    from pagoda.sampling.params import SamplingParams
    from tests.engine.helpers import run_to_completion

    prompts = [f"Fact {i}: the capital of France is" for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    one_process = run_to_completion(make_engine(), {
        p: (loaded_model.tokenizer.encode(p), greedy) for p in prompts})
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def complete(prompt: str) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(
            model="m", prompt=prompt, max_tokens=8, temperature=0)
        return raw.parse().choices[0].text, raw.headers["x-pagoda-replica"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(complete, prompts))
    assert [text for text, _ in answers] == [
        loaded_model.tokenizer.decode(one_process[p]) for p in prompts]
    assert len({replica for _, replica in answers}) == 2


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
