"""A tensor- or pipeline-parallel worker (ranks 1..N-1): `python -m pagoda.parallel.worker`,
started by rank 0 (peers.py) with its orders on stdin, or on another node by `pagoda worker`
(`--connect HOST:PORT --rank R`, nodes.py) with its orders over a connection to rank 0.

It loads the model itself, keeps its share (the same code path as rank 0: shard then
`prepare_model`, or `prepare_model` then cut to its stage), builds its share of the KV cache
with rank 0's block plan (same block ids on every rank: fewer heads per block, or only its
stage's layers), then runs its part of one forward per step message until stdin closes.
It never samples: the logits it helps gather land on rank 0. stdout carries the protocol, so
anything printed goes to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections import deque
from multiprocessing.connection import Connection

import torch


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s parallel-worker %(message)s")
    if argv[:1] == ["--connect"]:  # a rank on another node (nodes.py): one duplex connection
        from pagoda.parallel.nodes import JOIN_TIMEOUT_S, connect, dist_key

        conn_in = conn_out = connect(argv[1], ("rank", int(argv[3])), JOIN_TIMEOUT_S,
                                     dist_key())
    else:
        # The protocol owns the original stdout; fd 1 becomes stderr for logs and stray prints.
        conn_out = Connection(os.dup(1), readable=False)
        os.dup2(2, 1)
        conn_in = Connection(os.dup(0), writable=False)
    try:
        run(conn_in, conn_out)
    except EOFError:  # rank 0 went away
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 if it is listening
        traceback.print_exc()
        try:
            conn_out.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1
    return 0


def run(conn_in: Connection, conn_out: Connection) -> None:
    from pagoda.kv_cache.kv_setup import build_kv
    from pagoda.layers.decode_backend import select_decode_kernel
    from pagoda.loader.model_loader import load_model
    from pagoda.parallel import comm, partition, sharding
    from pagoda.parallel.pipeline import PipelineStages, keep_stage, stage_layers
    from pagoda.parallel.wire import Orders, from_wire
    from pagoda.quant.loading import file_linears
    from pagoda.worker.model_runner import ModelRunner
    from pagoda.worker.model_setup import TORCH_DTYPES, prepare_model, settle_weights

    orders: Orders = conn_in.recv()
    config, rank = orders.config, orders.rank
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    stage_index, tp_rank = divmod(rank, tp)
    torch.set_num_threads(orders.threads)
    device = torch.device(config.device)
    group, tp_group = comm.connect_grid(rank, tp, pp, orders.host, orders.port, device,
                                        shared_memory=orders.shared_memory)
    dtype = TORCH_DTYPES[config.dtype]
    loaded = load_model(orders.model_path, config.device, dtype, progress=False,
                        file_linears=file_linears(config.quantization))
    cfg = kv_cfg = loaded.config
    role = []
    if tp > 1:  # heads and columns first (quantization then sees only this rank's share)
        shard = partition.plan(cfg, tp_rank, tp)
        sharding.shard_weights(loaded.model, cfg, shard)
        kv_cfg = partition.local_config(cfg, shard)
        role.append(f"KV heads {list(shard.kv_heads)}")
    prepare_model(config, loaded, whole_layers=tp == 1)
    if tp > 1:
        assert tp_group is not None
        sharding.attach_collectives(loaded.model, cfg, tp_group)
    stages, layers = None, None
    if pp > 1:  # then the layers (GGUF blocks are found by layer number while quantizing)
        layers = stage_layers(cfg, stage_index, pp)
        keep_stage(loaded.model, layers, first=stage_index == 0)
        stages = PipelineStages(group, tp, cfg.hidden_size, dtype, device)
        role.append(f"layers {layers.start}-{layers.stop - 1}")
    settle_weights(config, loaded)
    message = conn_in.recv()
    if message is None:
        return
    _, kv_groups, invariant = message
    _, stores, layer_groups = build_kv(kv_groups, kv_cfg, device, dtype, False, "", layers)
    runner = ModelRunner(loaded.model, stores, config.block_size, device, (), None, layer_groups,
                         select_decode_kernel(config.attention_backend, device), invariant,
                         pipeline=stages)
    conn_out.send(("ready", None))
    logging.getLogger(__name__).info("rank %d of %d ready (%s)", rank, orders.world,
                                     ", ".join(role))
    in_flight: deque = deque()  # stage 0 under tensor parallelism: batches started, unfinished
    with torch.inference_mode():
        while (message := conn_in.recv()) is not None:
            kind, rows, num_rows = message
            if kind == "collect":  # rank 0 finishes its oldest batch: the LM head's collective
                runner.finish_forward(in_flight.popleft())
                continue
            batch = [from_wire(r) for r in rows]
            if stages is None:  # tensor parallelism alone: each batch to its end
                runner.forward(batch, num_rows)
            elif stages.first:
                in_flight.append(runner.start_forward(batch, num_rows))
            else:
                runner.forward_stage(batch, num_rows)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
