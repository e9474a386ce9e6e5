"""`--distributed-executor ray`: Ray places the tensor/pipeline-parallel ranks 1..N-1.

What vLLM's Ray executor does, on Pagoda's own worker: a placement group reserves one bundle of
CPUs per rank (PACK: on rank 0's node while it has room, spilling to other nodes of the
cluster), and one Ray task per bundle runs `pagoda.parallel.worker` in its `--connect` form, so
the rank dials rank 0's door (nodes.py) exactly as a rank started by `pagoda worker` does. The
door's secret is made here and handed to the tasks through their runtime environment. Rank 0
joins the Ray cluster of RAY_ADDRESS, or the one this process already joined (a Ray Serve
replica), or starts a local one.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from pagoda.parallel.nodes import KEY_ENV

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 300


def _run_rank(door: str, rank: int) -> int:  # runs in a Ray worker process
    from pagoda.parallel.worker import main

    return main(["--connect", door, "--rank", str(rank)])


class RayRanks:
    """The placement group and the tasks of ranks 1..N-1; `close()` releases both."""

    def __init__(self, num_ranks: int, threads: int):
        import ray
        from ray.util.placement_group import placement_group

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=True)
        self.ray = ray
        self.key = secrets.token_hex(16).encode()
        self.host = ray.util.get_node_ip_address()
        self.group = placement_group([{"CPU": threads}] * num_ranks, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.group)
            raise RuntimeError(f"Ray could not place {num_ranks} ranks of {threads} CPUs each "
                               f"within {PLACEMENT_TIMEOUT_S} s (`ray status` shows the free "
                               "CPUs)")
        self.threads = threads
        self.tasks: list[Any] = []

    def on_this_node(self) -> bool:
        """Whether every bundle landed on rank 0's node (shared-memory collectives apply)."""
        from ray.util import placement_group_table

        here = self.ray.get_runtime_context().get_node_id()
        nodes = placement_group_table(self.group)["bundles_to_node_id"].values()
        return all(node == here for node in nodes)

    def start(self, ranks: list[int], door: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        task = self.ray.remote(_run_rank)
        for index, rank in enumerate(ranks):
            self.tasks.append(task.options(
                num_cpus=self.threads, max_retries=0,
                runtime_env={"env_vars": {KEY_ENV: self.key.decode()}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=index)).remote(door, rank))
        log.info("Ray placed ranks %s (%d CPUs each)", ranks, self.threads)

    def close(self) -> None:
        """After the ranks were told to stop: wait briefly for them, then free the CPUs."""
        if self.tasks:
            _, running = self.ray.wait(self.tasks, num_returns=len(self.tasks), timeout=10)
            for task in running:
                self.ray.cancel(task, force=True)
        self.ray.util.remove_placement_group(self.group)
