"""Tensor parallelism over torch.distributed: one scheduler, N model runners (docs/parallel.md).

    partition.py  which heads, MLP columns and vocabulary rows each rank owns (pure arithmetic)
    sharding.py   cut a loaded model's weights to its rank's share; the collectives as hooks
    comm.py       the process group (gloo on CPU, nccl on CUDA) and its two collectives
    peers.py      rank 0's side: starts the workers, sends each step's batch to them
    worker.py     ranks 1..N-1: `python -m pagoda.parallel.worker`, one forward per step

Layering: parallel imports worker/ (the model runner and its set-up), never engine/ or above;
the engine imports parallel.
"""
