"""Helpers the benchmark scripts share for starting local servers (imported as a sibling module:
the scripts run as `python benchmarks/<name>.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen | None = None, *,
                 timeout: float = 300) -> None:
    """Poll `url`/health until it answers 200; fail early if `server` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"pagoda serve exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")
