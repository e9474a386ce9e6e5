"""Rank 0's side of tensor parallelism: start the workers, hand each the step, keep them honest.

Each worker is a `python -m pagoda.parallel.worker` child (not a multiprocessing child: the engine
process is a daemon, and daemons may not have children) talking to rank 0 over its stdin/stdout
pipes (private to the pair; EOF is how either side learns the other died). Start-up has two
phases so the workers load their weights while rank 0 loads its own: `start_peers` launches them
right after rank 0's load, `start_runners` hands them the KV plan once rank 0 has made it.
Every step, `send` gives each worker the batch rank 0's runner is about to run; each worker runs
the same forward on its share, the collectives meeting inside it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagoda.loader.model_loader import LoadedModel
from pagoda.models.config import ModelConfig
from pagoda.parallel import comm, partition, sharding
from pagoda.parallel.wire import to_wire

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig
    from pagoda.kv_cache.kv_setup import KVCacheConfig
    from pagoda.scheduler.output import ScheduledRequest

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600  # a worker loads, shards and quantizes its model within this


class PeerError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine cannot step any more."""


@dataclass
class Worker:
    rank: int
    process: subprocess.Popen[bytes]
    conn_out: Connection  # rank 0 -> worker (its stdin)
    conn_in: Connection  # worker -> rank 0 (its stdout)


class Peers:
    def __init__(self, config: EngineConfig, cfg: ModelConfig, workers: list[Worker],
                 group: comm.TPGroup, shard: partition.Shard):
        self.config, self.cfg, self.workers, self.group = config, cfg, workers, group
        self.shard = shard
        self.local_config = partition.local_config(cfg, shard)

    def attach(self, model: nn.Module) -> None:
        sharding.attach_collectives(model, self.cfg, self.group)

    def start_runners(self, kv_groups: list[KVCacheConfig], invariant_attention: bool) -> None:
        """Give the workers the KV plan; return once each has built its cache and runner."""
        for w in self.workers:
            self._send(w, ("runner", kv_groups, invariant_attention))
        for w in self.workers:
            self._wait_ready(w)
        log.info("tensor parallel: %d ranks ready", self.group.world)

    def send(self, scheduled: list[ScheduledRequest], num_rows: dict[str, int]) -> None:
        """The batch of the forward rank 0 is about to run (every rank must run it)."""
        rows = [to_wire(r) for r in scheduled]
        for w in self.workers:
            self._send(w, ("step", rows, num_rows))

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn_out.send(None)
            except OSError:
                pass
        for w in self.workers:
            try:
                w.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.conn_out.close()
            w.conn_in.close()

    def _send(self, w: Worker, message: object) -> None:
        try:
            w.conn_out.send(message)
        except OSError as exc:
            raise PeerError(f"tensor-parallel rank {w.rank} is gone "
                            f"(exit code {w.process.poll()})") from exc

    def _wait_ready(self, w: Worker) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not w.conn_in.poll(1.0):
            if w.process.poll() is not None:
                raise PeerError(f"tensor-parallel rank {w.rank} exited with code "
                                f"{w.process.returncode} while starting (its log is above)")
            if time.monotonic() > deadline:
                raise PeerError(f"tensor-parallel rank {w.rank} not ready in {READY_TIMEOUT_S} s")
        status, detail = w.conn_in.recv()
        if status != "ready":
            raise PeerError(f"tensor-parallel rank {w.rank} failed: {detail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peers(config: EngineConfig, loaded: LoadedModel) -> Peers:
    """Launch ranks 1..N-1, join the group as rank 0 and cut `loaded` to rank 0's share."""
    world = config.tensor_parallel_size
    cfg = loaded.config
    shard = partition.plan(cfg, 0, world)  # refuses a model that cannot be split this way
    if config.quantization == "gguf":
        raise ValueError("--tensor-parallel-size with --quantization gguf: GGUF blocks are not "
                         "sharded; use --quantization int8 or int4 (or fp32)")
    port = free_port()
    threads = max(1, (config.num_threads or torch.get_num_threads()) // world)
    workers = [_launch(config, loaded.path, rank, world, port, threads)
               for rank in range(1, world)]
    torch.set_num_threads(threads)  # each rank its own cores
    try:
        group = comm.connect(0, world, "127.0.0.1", port, torch.device(config.device))
    except Exception:
        for w in workers:
            w.process.kill()
        raise
    sharding.shard_weights(loaded.model, cfg, shard)
    log.info("tensor parallel: rank 0 of %d (KV heads %s, %d threads per rank)", world,
             list(shard.kv_heads), threads)
    return Peers(config, cfg, workers, group, shard)


def _launch(config: EngineConfig, model_path: str, rank: int, world: int, port: int,
            threads: int) -> Worker:
    process = subprocess.Popen([sys.executable, "-m", "pagoda.parallel.worker"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    conn_out = Connection(os.dup(process.stdin.fileno()), readable=False)
    conn_in = Connection(os.dup(process.stdout.fileno()), writable=False)
    process.stdin.close()
    process.stdout.close()
    worker = Worker(rank, process, conn_out, conn_in)
    conn_out.send((config, model_path, rank, world, port, threads))
    return worker
