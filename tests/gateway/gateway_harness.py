"""Helpers for gateway tests: fake upstream processes, a gateway on a thread, test configs."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pagoda.gateway.app import create_app
from pagoda.gateway.auth import hash_key
from pagoda.gateway.config import GatewayConfig, parse_config

FAKE_UPSTREAM = Path(__file__).with_name("fake_upstream.py")
KEY_ALICE = "sk-alice-test-key"
KEY_BOB = "sk-bob-test-key"
# cheap hashes: tests build many configs; production uses the CLI's 100k iterations
_HASHES = {k: hash_key(k, iterations=1000) for k in (KEY_ALICE, KEY_BOB)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


class FakeUpstream:
    """A fake upstream in its own process (so it can be SIGKILLed like a crashed replica)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_UPSTREAM), "--port", str(self.port), "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self) -> FakeUpstream:
        def up() -> bool:
            assert self.proc.poll() is None, f"fake upstream {self.name} exited"
            try:
                return httpx.get(self.url + "/stats", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up)
        return self

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/stats", timeout=5).json()

    def control(self, **behaviour: Any) -> None:
        httpx.post(self.url + "/control", json=behaviour, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/reset", timeout=5).raise_for_status()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


def start_upstreams(names: list[str]) -> list[FakeUpstream]:
    started = [FakeUpstream(n) for n in names]
    return [u.wait_ready() for u in started]


class GatewayServer:
    """A gateway app served by uvicorn on a thread of the test process."""

    def __init__(self, config: GatewayConfig, redis_url: str | None = None) -> None:
        self.app = create_app(config, redis_url=redis_url)
        self.state = self.app.state.gateway
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        uv_config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                   log_level="warning", access_log=False)
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> GatewayServer:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_config(pools: dict[str, list[str]], **overrides: Any) -> GatewayConfig:
    """Config with keys alice (unlimited unless overridden) and bob; `pools` maps model -> URLs.

    overrides: `alice` (dict of alice's key fields), `policy`, `virtual_models`, `cache`,
    `health`, `retry`, `redis_prefix`.
    """
    policy = overrides.pop("policy", "round_robin")
    alice = {"name": "alice", "hash": _HASHES[KEY_ALICE], **overrides.pop("alice", {})}
    bob = {"name": "bob", "hash": _HASHES[KEY_BOB], "models": [next(iter(pools))]}
    data: dict[str, Any] = {
        "models": [
            {"name": name, "policy": policy, "upstreams": urls} for name, urls in pools.items()
        ],
        "keys": [alice, bob],
        "health": {"interval_s": 0.2, "timeout_s": 1.0, **overrides.pop("health", {})},
        "redis_prefix": overrides.pop("redis_prefix", f"t{uuid.uuid4().hex[:8]}:"),
    }
    data.update(overrides)
    return parse_config(data)


def auth(key: str = KEY_ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_redis(port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server (no persistence) on `port`, or a free one; returns it and its
    URL. Passing the port of a killed one restarts Redis where the gateway expects it."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_for(up, timeout=10)
    return proc, f"redis://127.0.0.1:{port}/0"
