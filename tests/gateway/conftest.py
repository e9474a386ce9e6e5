"""Fixtures for gateway tests: three shared fake replicas and a real Redis (session-scoped)."""

from __future__ import annotations

import os

import pytest

from tests.gateway.gateway_harness import start_redis, start_upstreams


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
    proc, url = start_redis()
    yield url
    proc.terminate()
    proc.wait(timeout=10)
