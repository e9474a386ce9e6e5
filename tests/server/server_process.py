"""A real `pagoda serve` subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

KV_CACHE_MEMORY = 128 << 20  # 182 blocks of 16 tokens for the default model in fp32
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = API_KEY):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_codes: list[int] = []  # every /health status seen while starting
        pagoda = os.path.join(os.path.dirname(sys.executable), "pagoda")
        cmd = [pagoda, "serve", "--port", str(self.port), "--kv-cache-memory",
               str(KV_CACHE_MEMORY), "--log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagoda-serve-", suffix=".log")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, num_chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-num_chars:]

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pagoda serve exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            try:
                code = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            self.health_codes.append(code)
            if code == 200:
                return
            time.sleep(0.2)
        raise TimeoutError("pagoda serve did not become healthy:\n" + self.log_tail())

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, headers=self.headers, **kwargs)

    def kv(self) -> dict:
        return httpx.get(self.url + "/debug/kv", headers=self.headers, timeout=30).json()

    def wait_all_blocks_free(self, timeout: float = 10.0) -> dict:
        """Poll /debug/kv until no block is in use; returns the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            kv = self.kv()
            if kv["num_free_blocks"] == kv["num_total_blocks"] and kv["num_running"] == 0:
                return kv
            if time.monotonic() > deadline:
                return kv
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def serving(*args: str, api_key: str | None = API_KEY) -> Iterator[ServerProcess]:
    """A ready `pagoda serve` with these flags, stopped on exit (what server fixtures yield)."""
    proc = ServerProcess(*args, api_key=api_key)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
