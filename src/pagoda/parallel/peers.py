"""Rank 0's side of tensor and pipeline parallelism: start the workers, hand each the step, keep
them honest.

Each worker is a `python -m pagoda.parallel.worker` child (not a multiprocessing child: the engine
process is a daemon, and daemons may not have children) talking to rank 0 over its stdin/stdout
pipes (private to the pair; EOF is how either side learns the other died). Start-up has two
phases so the workers load their weights while rank 0 loads its own: `start_peers` launches them
right after rank 0's load, `start_runners` hands them the KV plan once rank 0 has made it.
Every step, `send` gives each worker the batch rank 0's runner is about to run; each worker runs
the same forward on its share (tensor parallelism: its heads and columns of every layer, the
collectives meeting inside it; pipeline parallelism: its stage's layers, pipeline.py). Under
both, stage 0's other ranks start each batch on `send` and finish their oldest on `collect`,
when rank 0 does, so their collectives come in rank 0's order.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagoda.loader.model_loader import LoadedModel
from pagoda.models.config import ModelConfig
from pagoda.parallel import comm, partition, sharding
from pagoda.parallel.nodes import accept_ranks, dist_key, node_ranks
from pagoda.parallel.pipeline import PipelineStages, keep_stage, stage_layers
from pagoda.parallel.wire import Orders, to_wire
from pagoda.worker.model_setup import TORCH_DTYPES

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig
    from pagoda.kv_cache.kv_setup import KVCacheConfig
    from pagoda.parallel.ray_executor import RayRanks
    from pagoda.scheduler.output import ScheduledRequest

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600  # a worker loads, shards and quantizes its model within this


class PeerError(RuntimeError):
    """A parallel worker failed or died; the engine cannot step any more."""


@dataclass
class Worker:
    rank: int
    process: subprocess.Popen[bytes] | None  # None: a rank on another node (nodes.py)
    conn_out: Connection  # rank 0 -> worker (its stdin, or the node connection)
    conn_in: Connection  # worker -> rank 0 (its stdout, or the same connection)

    def exit_code(self) -> str:
        if self.process is None:
            return "on another node"
        code = self.process.poll()
        return "still running" if code is None else f"exit code {code}"


class Peers:
    """The workers and the groups: `shard` (this rank's heads and columns) under tensor
    parallelism, `stage` (its layers) and `pipeline` under pipeline parallelism, both for a
    grid of tp x pp ranks."""

    def __init__(self, config: EngineConfig, cfg: ModelConfig, workers: list[Worker],
                 group: comm.TPGroup, tp_group: comm.TPGroup | None,
                 shard: partition.Shard | None = None, stage: range | None = None,
                 placed: RayRanks | None = None):
        self.config, self.cfg, self.workers, self.group = config, cfg, workers, group
        self.tp_group, self.placed = tp_group, placed
        self.shard, self.stage = shard, stage
        self.kind = ("tensor-parallel" if stage is None else "pipeline" if shard is None
                     else "parallel")
        # what the KV cache is built from: this rank's heads (of its stage's layers)
        self.local_config = partition.local_config(cfg, shard) if shard is not None else cfg
        self.pipeline = (None if stage is None else PipelineStages(
            group, config.tensor_parallel_size, cfg.hidden_size, TORCH_DTYPES[config.dtype],
            torch.device(config.device)))

    @property
    def whole_layers(self) -> bool:
        """Fused whole-layer kernels are fine unless tensor parallelism hooks each linear."""
        return self.shard is None

    def attach(self, model: nn.Module) -> None:
        """After prepare_model: hook the collectives in, then cut the model to stage 0."""
        if self.shard is not None:
            assert self.tp_group is not None
            sharding.attach_collectives(model, self.cfg, self.tp_group)
        if self.stage is not None:
            keep_stage(model, self.stage, first=True)

    def start_runners(self, kv_groups: list[KVCacheConfig], invariant_attention: bool) -> None:
        """Give the workers the KV plan; return once each has built its cache and runner."""
        for w in self.workers:
            self._send(w, ("runner", kv_groups, invariant_attention))
        for w in self.workers:
            self._wait_ready(w)
        log.info("%s: %d ranks ready", self.kind, self.group.world)

    def send(self, scheduled: list[ScheduledRequest], num_rows: dict[str, int]) -> None:
        """The batch of the forward rank 0 is about to run (every rank must run it)."""
        rows = [to_wire(r) for r in scheduled]
        for w in self.workers:
            self._send(w, ("step", rows, num_rows))

    def collect(self) -> None:
        """Rank 0 is about to finish its oldest batch in flight: stage 0's other ranks finish
        theirs too (the vocabulary-parallel LM head is a collective of stage 0's ranks)."""
        for w in self.workers:
            if w.rank < self.config.tensor_parallel_size:
                self._send(w, ("collect", None, None))

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn_out.send(None)
            except OSError:
                pass
        for w in self.workers:
            if w.process is not None:
                try:
                    w.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.process.kill()
                    w.process.wait()
            w.conn_out.close()
            w.conn_in.close()
        if self.placed is not None:
            self.placed.close()

    def _send(self, w: Worker, message: object) -> None:
        try:
            w.conn_out.send(message)
        except OSError as exc:
            raise PeerError(f"{self.kind} rank {w.rank} is gone ({w.exit_code()})") from exc

    def _wait_ready(self, w: Worker) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while not w.conn_in.poll(1.0):
                if w.process is not None and w.process.poll() is not None:
                    raise PeerError(f"{self.kind} rank {w.rank} exited with code "
                                    f"{w.process.returncode} while starting (its log is above)")
                if time.monotonic() > deadline:
                    raise PeerError(f"{self.kind} rank {w.rank} not ready in "
                                    f"{READY_TIMEOUT_S} s")
            status, detail = w.conn_in.recv()
        except (EOFError, OSError) as exc:
            raise PeerError(f"{self.kind} rank {w.rank} went away while starting "
                            f"({w.exit_code()}; its log is on its node)") from exc
        if status != "ready":
            raise PeerError(f"{self.kind} rank {w.rank} failed: {detail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peers(config: EngineConfig, loaded: LoadedModel) -> Peers:
    """Launch ranks 1..N-1 and join the groups as rank 0. Tensor parallelism cuts `loaded` to
    rank 0's heads here (before quantizing); pipeline parallelism cuts its layers in
    Peers.attach, once it is quantized."""
    cfg = loaded.config
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    world = tp * pp
    # refuse a model that cannot be split this way before starting anything
    shard = partition.plan(cfg, 0, tp) if tp > 1 else None
    stage = stage_layers(cfg, 0, pp) if pp > 1 else None
    total_threads = config.num_threads or torch.get_num_threads()
    placed = None  # Ray's placement of ranks 1..N-1 (--distributed-executor ray)
    if config.distributed_executor == "ray":
        from pagoda.parallel.ray_executor import RayRanks

        threads = max(1, total_threads // world)
        placed = RayRanks(world - 1, threads)
        host, key, local = placed.host, placed.key, range(1)
        one_machine = placed.on_this_node()
    else:
        host = config.master_addr if config.nnodes > 1 else "127.0.0.1"
        key = dist_key() if config.nnodes > 1 else b""
        local = node_ranks(0, config.nnodes, world)
        # each rank its own share of this node's cores (every node taken to be like this one)
        threads = max(1, total_threads // len(local))
        one_machine = config.nnodes == 1
    port = config.master_port or free_port()

    def orders(rank: int) -> Orders:
        return Orders(config, loaded.path, rank, world, host, port, threads, one_machine)

    workers = [_launch(orders(rank)) for rank in local if rank > 0]
    torch.set_num_threads(threads)
    try:
        remote = [rank for rank in range(world) if rank not in local]
        if placed is not None:
            placed.start(remote, f"{host}:{port + 1}")
        if remote:
            workers += _join_remote(orders, set(remote), config.nnodes, world, key)
        group, tp_group = comm.connect_grid(0, tp, pp, host, port, torch.device(config.device),
                                            shared_memory=one_machine)
    except Exception:
        for w in workers:
            if w.process is not None:
                w.process.kill()
            w.conn_out.close()
        if placed is not None:
            placed.close()
        raise
    if shard is not None:
        sharding.shard_weights(loaded.model, cfg, shard)
    log.info("rank 0 of %d (TP=%d x PP=%d; KV heads %s, layers %s; %d threads per rank)",
             world, tp, pp, list(shard.kv_heads) if shard else "all",
             f"{stage.start}-{stage.stop - 1}" if stage else "all", threads)
    return Peers(config, cfg, workers, group, tp_group, shard, stage, placed)


def _launch(orders: Orders) -> Worker:
    process = subprocess.Popen([sys.executable, "-m", "pagoda.parallel.worker"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    conn_out = Connection(os.dup(process.stdin.fileno()), readable=False)
    conn_in = Connection(os.dup(process.stdout.fileno()), writable=False)
    process.stdin.close()
    process.stdout.close()
    worker = Worker(orders.rank, process, conn_out, conn_in)
    conn_out.send(orders)
    return worker


def _join_remote(orders: Callable[[int], Orders], wanted: set[int], nnodes: int, world: int,
                 key: bytes) -> list[Worker]:
    """Wait for the ranks that dial in (other nodes' `pagoda worker`, or Ray's tasks) and give
    each its orders."""
    host, port = orders(0).host, orders(0).port
    if nnodes > 1:
        log.info("waiting for nodes 1..%d on %s:%d (`pagoda worker --master-addr %s "
                 "--master-port %d --node-rank I`)", nnodes - 1, host, port + 1, host, port)
    conns = accept_ranks(host, port + 1, wanted, nnodes, world, READY_TIMEOUT_S, key)
    workers = [Worker(rank, None, conn, conn) for rank, conn in sorted(conns.items())]
    for w in workers:
        w.conn_out.send(orders(w.rank))
    return workers
