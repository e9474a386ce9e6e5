"""The process groups of tensor and pipeline parallelism: gloo on CPU, nccl for CUDA tensors;
built from an explicit TCPStore rather than torch.distributed's process-global default group, so
a process may hold several engines (tests do) and nothing is ambient.

Ranks are laid out stage-major: rank = stage * tp + tp_rank. `connect_grid` gives every rank the
group of all ranks (pipeline stages pass hidden states point to point over it) and its stage's
tensor-parallel group (the all-reduces and the all-gather); with one stage they are one group.

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


def connect_grid(rank: int, tp: int, pp: int, host: str, port: int, device: torch.device,
                 timeout: datetime.timedelta = COLLECTIVE_TIMEOUT, shared_memory: bool = True
                 ) -> tuple[TPGroup, TPGroup | None]:
    """(all ranks, this rank's tensor-parallel group or None when tp == 1). `shared_memory`:
    every rank is on this machine, so the tensor-parallel collectives may use /dev/shm."""
    if pp == 1:
        group = connect(rank, tp, host, port, device, timeout, shared_memory)
        return group, group
    world = tp * pp
    store = dist.TCPStore(host, port, world, rank == 0, timeout=timeout)
    whole = TPGroup(rank, world, _process_group(store, rank, world, device, timeout), store)
    if tp == 1:
        return whole, None
    stage, tp_rank = divmod(rank, tp)
    sub = dist.PrefixStore(f"pagoda-stage{stage}/", store)
    shm = None
    if shared_memory and usable(device):
        shm = ShmCollectives(sub, tp_rank, tp, timeout.total_seconds())
    return whole, TPGroup(tp_rank, tp, _process_group(sub, tp_rank, tp, device, timeout), store,
                          shm)


def _process_group(store: dist.Store, rank: int, world: int, device: torch.device,
                   timeout: datetime.timedelta) -> dist.ProcessGroup:
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def connect(rank: int, world: int, host: str, port: int, device: torch.device,
            timeout: datetime.timedelta = COLLECTIVE_TIMEOUT, shared_memory: bool = True
            ) -> TPGroup:
    """Join the group; rank 0 hosts the rendezvous store on `host:port`. `shared_memory`:
    collectives through /dev/shm where shm_reduce.usable() (every rank on this machine)."""
    store = dist.TCPStore(host, port, world, rank == 0, timeout=timeout)
    group = _process_group(store, rank, world, device, timeout)
    shm = None
    if shared_memory and usable(device):
        shm = ShmCollectives(store, rank, world, timeout.total_seconds())
    return TPGroup(rank, world, group, store, shm)
