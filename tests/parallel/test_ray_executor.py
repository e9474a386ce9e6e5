"""`--distributed-executor ray`: Ray's placement group holds ranks 1..N-1 (Ray tasks running
Pagoda's worker, dialing rank 0 as another node's ranks do) on a local Ray instance; the
contract is the one-process one, and stopping the engine frees the Ray CPUs."""

from __future__ import annotations

import time

import pytest

from tests.parallel.test_tensor_parallel import assert_reference_tokens, tp_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_places_the_ranks(local_ray, prompt_ids, reference):
    """Three ranks, two of them Ray's (their collectives and the worker protocol are what the
    executor changes; pipeline stages find their peers the same way: test_nodes.py)."""
    engine = tp_engine(distributed_executor="ray", num_threads=2, tensor_parallel_size=3)
    try:
        assert engine.peers.placed is not None and len(engine.peers.workers) == 2
        assert all(w.process is None for w in engine.peers.workers)  # none is our child
        assert local_ray.available_resources().get("CPU", 0) < 2  # the ranks' bundles
        assert_reference_tokens(engine, prompt_ids[:3], reference, "with Ray's ranks")
    finally:
        engine.close()
    deadline = time.monotonic() + 20  # Ray reports freed resources a moment later
    while local_ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert local_ray.available_resources().get("CPU", 0) == 2  # the placement group is gone


def test_ray_with_nodes_is_refused():
    with pytest.raises(ValueError, match="places the ranks itself"):
        tp_engine(tensor_parallel_size=2, distributed_executor="ray", nnodes=2,
                  master_port=29500)
