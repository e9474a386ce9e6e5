"""The tensor-parallel process group: gloo on CPU, nccl for CUDA tensors; built from an explicit
TCPStore rather than torch.distributed's process-global default group, so a process may hold
several engines (tests do) and nothing is ambient.

Collectives run inside the model's forward only. Between steps workers block on rank 0's step
channel (peers.py), not on a collective, so an idle server never hits the group's timeout; a
collective that waits longer than `timeout` (a rank hung mid-step) raises instead of hanging.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagoda.parallel.shm_reduce import ShmCollectives, usable

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass
class TPGroup:
    rank: int
    world: int
    group: dist.ProcessGroup
    store: dist.Store  # rank 0 hosts the rendezvous server: it lives as long as the group
    shm: ShmCollectives | None = None  # one machine, x86 CPU: shared memory instead of TCP

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (the row-parallel projections' partial sums)."""
        if self.shm is not None and self.shm.fits(t):
            return self.shm.all_reduce(t)
        self.group.allreduce([t]).wait()
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (..., n) `t` along the last dimension, in rank order."""
        if self.shm is not None and self.shm.fits(t):
            return self.shm.gather_last(t)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.group.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=-1)


def connect(rank: int, world: int, host: str, port: int, device: torch.device,
            timeout: datetime.timedelta = COLLECTIVE_TIMEOUT, shared_memory: bool = True
            ) -> TPGroup:
    """Join the group; rank 0 hosts the rendezvous store on `host:port`. `shared_memory`:
    collectives through /dev/shm where shm_reduce.usable() (every rank on this machine)."""
    store = dist.TCPStore(host, port, world, rank == 0, timeout=timeout)
    if device.type == "cuda":
        group: dist.ProcessGroup = dist.ProcessGroupNCCL(store, rank, world)
    else:
        group = dist.ProcessGroupGloo(store, rank, world, timeout)
    shm = None
    if shared_memory and usable(device):
        shm = ShmCollectives(store, rank, world, timeout.total_seconds())
    return TPGroup(rank, world, group, store, shm)
