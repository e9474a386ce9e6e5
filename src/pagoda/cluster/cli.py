"""`pagoda ray-serve`: `pagoda serve`'s app as a Ray Serve application (docs/scaling.md).

Takes every flag of `pagoda serve` (host and port become the Ray HTTP proxy's) plus the replica
count or the autoscaling range. Without `--ray-address` it starts a Ray instance on this machine
(as `ray.init()` does); with one it joins that cluster, whose nodes then host the replicas.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from pagoda.server.cli import add_server_args, config_from_args

log = logging.getLogger("pagoda.cluster")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ray-serve", help="serve replicas of the OpenAI app on Ray Serve",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_args(p)
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--num-replicas", default="1",
                   help="replicas to run, or 'auto' to autoscale between --min-replicas and "
                   "--max-replicas on ongoing requests")
    r.add_argument("--min-replicas", type=int, default=1)
    r.add_argument("--max-replicas", type=int, default=2)
    r.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="autoscaling aims for this many requests in flight per replica")
    r.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="per replica; Ray's proxy queues requests beyond it")
    r.add_argument("--ray-router", choices=("pow2", "prefix"), default="pow2",
                   help="pow2: Ray's proxy picks the replica with the shorter queue of two; "
                   "prefix: an ingress deployment reads each prompt and keeps a prefix on one "
                   "replica (its KV blocks cached there) while that replica has at most 1.25x "
                   "its share of the requests in flight; WebSocket /v1/ws needs pow2")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto', 'ray://host:10001'); default: start one "
                   "on this machine")
    r.add_argument("--ray-num-cpus", type=int, default=None,
                   help="CPUs of the Ray instance started here (default: all)")
    p.set_defaults(func=run)


def ray_config_from_args(args: argparse.Namespace) -> Any:
    from pagoda.cluster.ray_serve import RayServeConfig

    if args.num_replicas == "auto":
        num_replicas = None
    elif args.num_replicas.isdigit():
        num_replicas = int(args.num_replicas)
    else:
        raise ValueError(f"--num-replicas must be a positive integer or 'auto', "
                         f"not {args.num_replicas!r}")
    return RayServeConfig(num_replicas=num_replicas, min_replicas=args.min_replicas,
                          max_replicas=args.max_replicas,
                          target_ongoing_requests=args.target_ongoing_requests,
                          max_ongoing_requests=args.max_ongoing_requests,
                          graceful_shutdown_timeout_s=args.shutdown_grace,
                          address=args.ray_address, router=args.ray_router)


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from pagoda.cluster.ray_serve import DEPLOYMENT, application

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    ray_config = ray_config_from_args(args)
    if config.engine.num_threads is None:
        # one replica per core group: split this machine's cores between the most replicas
        most = ray_config.num_replicas or ray_config.max_replicas
        threads = max(1, (args.ray_num_cpus or os.cpu_count() or 1) // most)
        config = dataclasses.replace(
            config, engine=dataclasses.replace(config.engine, num_threads=threads))
    ray.init(address=ray_config.address, num_cpus=args.ray_num_cpus, include_dashboard=False,
             logging_level=logging.WARNING, configure_logging=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(config, ray_config), name=DEPLOYMENT, route_prefix="/")
        log.info("Ray Serve app %r ready on http://%s:%d (%s)", DEPLOYMENT, config.host,
                 config.port, f"{ray_config.num_replicas} replicas"
                 if ray_config.num_replicas else
                 f"autoscaling {ray_config.min_replicas}-{ray_config.max_replicas} replicas")
        stop.wait()
        log.info("shutting down: draining replicas")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
