"""The tensor-parallel collectives across real processes: shared-memory all-reduce and
all-gather against the exact sums, the same bits on every rank, many rounds (both buffers
reused), gloo for what does not fit, and a dead peer reported rather than waited on."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os

import pytest
import torch

from pagoda.parallel import comm, shm_reduce
from pagoda.parallel.peers import free_port

ROUNDS = 50


def rank_main(rank: int, world: int, ports: dict[bool, int], out: mp.Queue) -> None:
    """One rank: a group per mode in `ports` (True: shared memory where usable, False: gloo
    alone), each its own store and collectives, so one process start serves both modes."""
    torch.set_num_threads(1)
    for shared, port in ports.items():
        group = comm.connect(rank, world, "127.0.0.1", port, torch.device("cpu"),
                             shared_memory=shared)
        results = []
        for i in range(ROUNDS):
            n = 7 + 13 * i
            t = torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + rank))
            results.append(group.all_reduce(t.clone()))
            results.append(group.gather_last(t.view(1, n)))
        big = torch.full((shm_reduce.MAX_ELEMENTS + 1,), float(rank + 1))
        results.append(group.all_reduce(big)[:4].clone())  # through gloo
        # plain lists: a tensor in a queue is passed by a file descriptor that dies with its
        # process
        out.put((shared, rank, group.shm is not None, [t.tolist() for t in results]))


@functools.cache
def run(world: int) -> dict[bool, dict[int, tuple[bool, list[torch.Tensor]]]]:
    """{shared: {rank: (used shared memory, results)}}: shared memory for every world, and gloo
    alone too for two ranks (test_gloo_alone_gives_the_same_sums), from the same processes
    (a process start, torch's import, is most of a run's time; the module's tests share it)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ports = {True: free_port()} | ({False: free_port()} if world == 2 else {})
    procs = [ctx.Process(target=rank_main, args=(r, world, ports, out)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[bool, dict[int, tuple[bool, list[torch.Tensor]]]] = {s: {} for s in ports}
    for _ in range(world * len(ports)):
        shared, rank, used_shm, results = out.get(timeout=120)
        got[shared][rank] = (used_shm, [torch.tensor(r, dtype=torch.float32) for r in results])
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_are_exact_and_identical_on_every_rank(world):
    if not shm_reduce.usable(torch.device("cpu")):
        pytest.skip("shared-memory collectives need an x86 CPU with /dev/shm")
    got = run(world)[True]
    assert all(used for used, _ in got.values())
    for i in range(ROUNDS):
        n = 7 + 13 * i
        parts = [torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + r))
                 for r in range(world)]
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        for rank in range(world):
            results = got[rank][1]
            assert torch.equal(results[2 * i], total), f"round {i} rank {rank}"
            assert torch.equal(results[2 * i + 1], torch.cat(parts).view(1, -1))
    expected_big = float(sum(range(1, world + 1)))
    assert all(torch.all(got[r][1][-1] == expected_big) for r in range(world))
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("pagoda-tp-")]


def test_gloo_alone_gives_the_same_sums():
    shm, gloo = run(2)[True], run(2)[False]
    assert not gloo[0][0]
    for a, b in zip(shm[0][1], gloo[0][1], strict=True):
        assert torch.equal(a, b)  # two ranks: a + b either way


def test_a_reaped_process_is_not_alive():
    """What the wait loop checks (the killed-rank tests in test_tensor_parallel*.py run it)."""
    if not shm_reduce.usable(torch.device("cpu")):
        pytest.skip("shared-memory collectives need an x86 CPU with /dev/shm")
    assert shm_reduce.alive(os.getpid())
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=int)
    child.start()
    child.join()
    assert not shm_reduce.alive(child.pid)
