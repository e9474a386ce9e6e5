"""`pagoda worker`: run this machine's share of a tensor- or pipeline-parallel engine whose rank 0
(`pagoda serve ... --nnodes N --master-addr A --master-port P`) runs on another machine."""

from __future__ import annotations

import argparse
import logging

from pagoda.parallel.nodes import JOIN_TIMEOUT_S, run_node


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pagoda worker %(message)s")
    if args.node_rank < 1:
        raise ValueError("--node-rank must be 1 or more (node 0 is the engine itself)")
    try:
        return run_node(args.master_addr, args.master_port, args.node_rank, args.join_timeout)
    except (TimeoutError, ConnectionError) as exc:
        raise ValueError(str(exc)) from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker", help="run this node's ranks of a parallel engine on another machine",
        description="Start this node's tensor/pipeline-parallel ranks for the engine at "
        "--master-addr (docs/parallel.md). Every node needs the same model files at the same "
        "path and the same PAGODA_DIST_KEY.")
    p.add_argument("--master-addr", required=True, help="rank 0's address")
    p.add_argument("--master-port", type=int, required=True, help="rank 0's --master-port")
    p.add_argument("--node-rank", type=int, required=True, help="this node's number, 1..N-1")
    p.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_S,
                   help="seconds to keep knocking while rank 0 is not up")
    p.set_defaults(func=run)
