"""Fixtures for gateway tests: three shared fake replicas and a real Redis (session-scoped)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from tests.gateway.gateway_harness import free_port, start_upstreams, wait_for


@pytest.fixture(scope="session")
def fake_pool():
    """Three fake replicas shared by the tests that do not kill any; reset before each use."""
    upstreams = start_upstreams(["r1", "r2", "r3"])
    yield upstreams
    for u in upstreams:
        u.stop()


@pytest.fixture
def replicas(fake_pool):
    for u in fake_pool:
        u.reset()
    return fake_pool


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis: PAGODA_TEST_REDIS_URL if set, else a throwaway redis-server on a free port."""
    given = os.environ.get("PAGODA_TEST_REDIS_URL")
    if given:
        yield given
        return
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
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
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
