"""`pagoda ray-serve` whose replicas are tensor-parallel engines of two ranks, the second placed
by Ray (`--distributed-executor ray`: a task in the Serve cluster, not a child of the replica).
Marked `soak` (`make soak`): four model loads on 2 cores before the first answer; the plain
replicas' routing, streaming and aborts are test_ray_serve.py's, Ray-placed ranks outside Serve
tests/parallel/test_ray_executor.py's."""

from __future__ import annotations

import psutil
import pytest

from tests.cluster.ray_harness import assert_one_process_greedy_text, ray_serve

pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.fixture(scope="module")
def sharded_app():
    # each replica is rank 0 (half a CPU) and its second rank a Ray task in a placement group
    # (a CPU): three of Ray's logical CPUs for the two replicas
    with ray_serve("--num-replicas", "2", "--tensor-parallel-size", "2",
                   "--distributed-executor", "ray", "--ray-num-cpus", "3",
                   "--ray-router", "prefix",
                   # the file's blocks as the fp32 product, which one fp32 process's greedy text
                   # is compared with (tests/parallel/test_tensor_parallel.py's tp_engine: why)
                   "--quant-kernel", "wgemm") as url:
        yield url


def test_sharded_replicas_give_one_process_greedy_text(sharded_app, make_engine, loaded_model):
    assert_one_process_greedy_text(sharded_app, make_engine, loaded_model)
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if "ray::_run_rank" in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) == 2  # one Ray-placed rank per replica, in the Serve cluster
