"""All-reduce and all-gather through shared memory, for ranks on one machine.

gloo's loopback TCP costs ~1 ms per collective, and a tensor-parallel Llama step makes two per
layer (61 for SmolLM2's 30 layers plus the LM head): at batch 1 that was most of the step. Here
each rank copies its part into its own slot of a shared buffer, publishes the round number in
its flag, waits until every rank's flag shows the round, then reads all slots and sums them in
rank order, so every rank computes the identical sum (the ranks must agree bit for bit, or their
replicated activations drift apart).

Invariants:
- Two buffers used alternately (round parity). A rank writes round k+2 into the buffer it read
  in round k only after every rank published round k+1, which each did after its own read of
  round k: no rank overwrites data another is still reading.
- A wait ends in an error, never a hang: a rank whose process is gone (or a zombie) or that
  has not published within the group's timeout fails the collective.
- The flag is stored after the data. x86's memory model (TSO) keeps two stores of one core in
  order for every other core, which is why this path is used on x86 CPUs only (elsewhere, gloo).
"""

from __future__ import annotations

import os
import platform
import secrets
import time
from pathlib import Path

import torch
import torch.distributed as dist

MAX_ELEMENTS = 1 << 21  # per rank and buffer (8 MiB of fp32); larger tensors go through gloo
SHM_DIR = Path("/dev/shm")


def usable(device: torch.device) -> bool:
    return (device.type == "cpu" and SHM_DIR.is_dir()
            and platform.machine().lower() in ("x86_64", "amd64"))


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class ShmCollectives:
    def __init__(self, store: dist.Store, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        if rank == 0:
            token = secrets.token_hex(8)
            store.set("pagoda-shm", token)
        else:
            token = store.get("pagoda-shm").decode()
        base = SHM_DIR / f"pagoda-tp-{token}"
        flags_path, data_path = f"{base}.flags", f"{base}.data"
        nflags, ndata = 3 * world, 2 * world * MAX_ELEMENTS  # two rounds' flags, then pids
        self.flags = torch.from_file(flags_path, shared=True, size=nflags, dtype=torch.int64)
        self.data = torch.from_file(data_path, shared=True, size=ndata, dtype=torch.float32
                                    ).view(2, world, MAX_ELEMENTS)
        self.flags_view = self.flags[:2 * world].view(2, world)
        self.pids = self.flags[2 * world:]
        self.pids[rank] = os.getpid()
        store.set(f"pagoda-shm-mapped-{rank}", "1")
        if rank == 0:  # once every rank has mapped the files, they need no name
            store.wait([f"pagoda-shm-mapped-{r}" for r in range(world)])
            for path in (flags_path, data_path):
                os.unlink(path)
        self.round = 0
        self._since = 0.0  # when the current long wait began

    def fits(self, t: torch.Tensor) -> bool:
        return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() <= MAX_ELEMENTS

    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        """Publish `t` and wait for every rank's part; returns the (world, n) parts."""
        self.round += 1
        slot = self.round & 1
        n = t.numel()
        parts = self.data[slot, :, :n]
        parts[self.rank].copy_(t.reshape(-1))
        self.flags_view[slot, self.rank] = self.round
        for r in range(self.world):
            spins = 0
            while int(self.flags_view[slot, r]) < self.round:
                spins += 1
                if spins > 64:  # oversubscribed cores: let the rank we wait for run
                    os.sched_yield()
                if spins % 4096 == 0:
                    self._check(r, spins)
        return parts

    def _check(self, r: int, spins: int) -> None:
        if spins == 4096:
            self._since = time.monotonic()
        elif time.monotonic() - self._since > self.timeout_s:
            raise RuntimeError(f"tensor-parallel rank {r} did not reach the collective in "
                               f"{self.timeout_s:.0f} s")
        if not alive(int(self.pids[r])):
            raise RuntimeError(f"tensor-parallel rank {r} (pid {int(self.pids[r])}) died")
        if spins > 1_000_000:  # a long wait (a big prefill elsewhere): stop burning the core
            time.sleep(0.0001)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(t)
        total = parts[0].clone()
        for r in range(1, self.world):  # rank order: the same sum on every rank
            total += parts[r]
        t.copy_(total.view(t.shape))
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(t.contiguous())
        return torch.cat([p.view(t.shape) for p in parts], dim=-1)
