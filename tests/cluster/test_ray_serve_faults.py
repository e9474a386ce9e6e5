"""`pagoda ray-serve` under stress, in order on one app (autoscaling 1-2 replicas): one
replica when quiet, two under sustained load (the time it took is printed), and a replica
SIGKILLed under load replaced with no request failing for the clients. Marked `soak`: each
model load of a new replica takes most of a minute on 2 cores, so `make soak` runs these and
`make test` does not."""

from __future__ import annotations

import subprocess
import time

import openai
import pytest

from tests.cluster.ray_harness import Load, ray_serve, replica_pids
from tests.gateway.gateway_harness import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.fixture(scope="module")
def ray_app():
    with ray_serve("--num-replicas", "auto", "--min-replicas", "1", "--max-replicas", "2",
                   "--target-ongoing-requests", "2") as url:
        yield url


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
