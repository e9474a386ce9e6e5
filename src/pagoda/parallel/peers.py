"""Rank 0's side of tensor and pipeline parallelism: start the workers, hand each the step, keep
them honest.

Each worker is a `python -m pagoda.parallel.worker` child (not a multiprocessing child: the engine
process is a daemon, and daemons may not have children) talking to rank 0 over its stdin/stdout
pipes (private to the pair; EOF is how either side learns the other died). Start-up has two
phases so the workers load their weights while rank 0 loads its own: `start_peers` launches them
right after rank 0's load, `start_runners` hands them the KV plan once rank 0 has made it.
Every step, `send` gives each worker the batch rank 0's runner is about to run; each worker runs
the same forward on its share (tensor parallelism: its heads and columns of every layer, the
collectives meeting inside it; pipeline parallelism: its stage's layers, pipeline.py).
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
from pagoda.parallel.nodes import accept_ranks, node_ranks
from pagoda.parallel.pipeline import PipelineStages, keep_stage, stage_layers
from pagoda.parallel.wire import to_wire
from pagoda.worker.model_setup import TORCH_DTYPES

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig
    from pagoda.kv_cache.kv_setup import KVCacheConfig
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
    """The workers and the group; `shard` under tensor parallelism, `stage` (this rank's
    layers) and `pipeline` under pipeline parallelism."""

    def __init__(self, config: EngineConfig, cfg: ModelConfig, workers: list[Worker],
                 group: comm.TPGroup, shard: partition.Shard | None = None,
                 stage: range | None = None):
        self.config, self.cfg, self.workers, self.group = config, cfg, workers, group
        self.shard, self.stage = shard, stage
        self.kind = "tensor-parallel" if shard is not None else "pipeline"
        # what the KV cache is built from: this rank's heads, or all heads of its layers
        self.local_config = partition.local_config(cfg, shard) if shard is not None else cfg
        self.pipeline = (None if stage is None else PipelineStages(
            group, cfg.hidden_size, TORCH_DTYPES[config.dtype], torch.device(config.device)))

    @property
    def whole_layers(self) -> bool:
        """Fused whole-layer kernels are fine unless tensor parallelism hooks each linear."""
        return self.shard is None

    def attach(self, model: nn.Module) -> None:
        """After prepare_model: hook the collectives in, or cut the model to stage 0."""
        if self.shard is not None:
            sharding.attach_collectives(model, self.cfg, self.group)
        else:
            assert self.stage is not None
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
    """Launch ranks 1..N-1 and join the group as rank 0. Tensor parallelism cuts `loaded` to
    rank 0's share here; pipeline parallelism in Peers.attach, once it is quantized."""
    cfg = loaded.config
    pipelined = config.pipeline_parallel_size > 1
    world = config.pipeline_parallel_size if pipelined else config.tensor_parallel_size
    # refuse a model that cannot be split this way before starting anything
    shard = None if pipelined else partition.plan(cfg, 0, world)
    stage = stage_layers(cfg, 0, world) if pipelined else None
    if not pipelined and config.quantization == "gguf":
        raise ValueError("--tensor-parallel-size with --quantization gguf: GGUF blocks are not "
                         "sharded; use --quantization int8 or int4 (or fp32)")
    host = config.master_addr if config.nnodes > 1 else "127.0.0.1"
    port = config.master_port or free_port()
    local = node_ranks(0, config.nnodes, world)
    # each rank its own share of this node's cores (every node is taken to be like this one)
    threads = max(1, (config.num_threads or torch.get_num_threads()) // len(local))
    setup = (config, loaded.path, world, host, port, threads)
    workers = [_launch(setup, rank) for rank in local if rank > 0]
    torch.set_num_threads(threads)
    try:
        if config.nnodes > 1:
            workers += _join_remote(setup, config.nnodes)
        # stages exchange hidden states point to point: no shared-memory collectives; nor
        # across machines
        group = comm.connect(0, world, host, port, torch.device(config.device),
                             shared_memory=not pipelined and config.nnodes == 1)
    except Exception:
        for w in workers:
            if w.process is not None:
                w.process.kill()
            w.conn_out.close()
        raise
    if shard is not None:
        sharding.shard_weights(loaded.model, cfg, shard)
        log.info("tensor parallel: rank 0 of %d (KV heads %s, %d threads per rank)", world,
                 list(shard.kv_heads), threads)
    else:
        log.info("pipeline parallel: rank 0 of %d (layers %d-%d, %d threads per rank)", world,
                 stage.start, stage.stop - 1, threads)
    return Peers(config, cfg, workers, group, shard, stage)


def _orders(setup: tuple, rank: int) -> tuple:
    """What a worker is told first: (config, model path, rank, world, host, port, threads)."""
    config, path, world, host, port, threads = setup
    return (config, path, rank, world, host, port, threads)


def _launch(setup: tuple, rank: int) -> Worker:
    process = subprocess.Popen([sys.executable, "-m", "pagoda.parallel.worker"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    conn_out = Connection(os.dup(process.stdin.fileno()), readable=False)
    conn_in = Connection(os.dup(process.stdout.fileno()), writable=False)
    process.stdin.close()
    process.stdout.close()
    worker = Worker(rank, process, conn_out, conn_in)
    conn_out.send(_orders(setup, rank))
    return worker


def _join_remote(setup: tuple, nnodes: int) -> list[Worker]:
    """Wait for the other nodes' ranks (`pagoda worker`) and give each its orders."""
    config, _, world, host, port, _ = setup
    log.info("waiting for nodes 1..%d on %s:%d (`pagoda worker --master-addr %s --master-port "
             "%d --node-rank I`)", nnodes - 1, host, port + 1, host, port)
    conns = accept_ranks(host, port + 1, nnodes, world, READY_TIMEOUT_S)
    workers = [Worker(rank, None, conn, conn) for rank, conn in sorted(conns.items())]
    for w in workers:
        w.conn_out.send(_orders(setup, w.rank))
    return workers
