"""Pagoda's OpenAI app as a Ray Serve application: each replica is one engine behind the same
FastAPI routes as `pagoda serve`, and Ray's HTTP proxy routes between them.

Ray Serve owns what a home-made process manager would: placing replicas on the cluster's nodes,
restarting a dead one, autoscaling on ongoing requests, power-of-two-choices routing, and
draining a replica before it stops. Pagoda supplies the replica:

- its constructor loads the model (awaited), so Ray marks a replica running — and routes to it —
  only once it can generate; the app is built afterwards around that loaded engine
  (`__serve_build_asgi_app__`, Ray's late-bound ingress), so nothing engine-side is pickled;
- `check_health` raises when the engine has died, so Ray replaces the replica;
- each replica reserves `num_threads` CPUs, so Ray places no more replicas on a node than its
  cores can run without the replicas fighting over them.

Two routers (`router`): "pow2" (default) makes the replicas the app's ingress and lets Ray's
proxy pick by queue length; "prefix" puts a light ingress deployment in front that reads each
body and relays it through a handle whose router keeps a prompt prefix on one replica, where
its KV blocks are cached (relay.py, prefix_router.py; WebSocket is served by "pow2" only).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagoda.server.config import ServerConfig

if TYPE_CHECKING:
    from pagoda.cluster.relay import RelayedRequest

DEPLOYMENT = "pagoda"


@dataclass(frozen=True)
class RayServeConfig:
    """How many replicas and how Ray scales them; `num_replicas` pins, the rest autoscale."""

    num_replicas: int | None = 1  # None: autoscale between min and max replicas
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # per replica, what autoscaling aims for
    max_ongoing_requests: int = 64  # per replica; the proxy queues beyond it
    graceful_shutdown_timeout_s: float = 30.0  # drain on scale-down or shutdown
    address: str | None = None  # an existing cluster ("auto", "ray://..."); None: start one
    router: str = "pow2"  # "pow2": Ray's proxy picks by queue length; "prefix": relay.py
    prefix_chars: int = 256  # prefix router: how much of the prompt picks the replica

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError("num_replicas must be at least 1")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise ValueError("target_ongoing_requests and max_ongoing_requests must be positive")
        if self.router not in ("pow2", "prefix"):
            raise ValueError(f"router must be 'pow2' or 'prefix', not {self.router!r}")
        if self.prefix_chars < 1:
            raise ValueError("prefix_chars must be at least 1")

    def deployment_options(self, cpus_per_replica: float) -> dict[str, Any]:
        options: dict[str, Any] = {
            "name": DEPLOYMENT,
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
            "ray_actor_options": {"num_cpus": cpus_per_replica},
        }
        if self.router == "prefix":
            from ray.serve.config import RequestRouterConfig

            from pagoda.cluster.prefix_router import PrefixAffinityRouter

            options["request_router_config"] = RequestRouterConfig(
                request_router_class=PrefixAffinityRouter)
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                # react within seconds: a CPU replica saturates quickly
                "upscale_delay_s": 3.0, "downscale_delay_s": 30.0, "metrics_interval_s": 1.0,
                "look_back_period_s": 5.0}
        return options


class PagodaReplica:
    """One engine and its OpenAI routes (wrapped by `serve.ingress()` in `application`)."""

    async def __init__(self, config: ServerConfig) -> None:
        import ray

        from pagoda.server.engine_client import EngineClient

        # The engine runs in a child process of its own, not a Ray worker: the ranks Ray places
        # for it (--distributed-executor ray) must join this replica's cluster rather than a
        # new local Ray instance, which is what that process started without RAY_ADDRESS.
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        self.config = config
        self.client = EngineClient(config)
        await self.client.load()  # raises on failure: Ray reports the replica as failed

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from pagoda.server.app import build_app

        app = build_app(self.config, client=self.client)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    async def relay(self, request: RelayedRequest) -> AsyncIterator[dict[str, Any]]:
        """The "prefix" router's path in: this replica's app run on a relayed request."""
        from pagoda.cluster.relay import run_relayed

        if getattr(self, "app", None) is None:
            self.app = self.__serve_build_asgi_app__()
        async for message in run_relayed(self.app, request):
            yield message

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (scale-down, shutdown): the engine process
        and its ranks stop with the replica rather than whenever Ray ends the actor."""
        client = getattr(self, "client", None)
        if client is not None:
            client.shutdown()

    def check_health(self) -> None:
        status = self.client.check_engine()
        if status == "failed":
            raise RuntimeError(f"the engine failed: {self.client.detail}")


class ReplicaHeader:
    """ASGI middleware naming the replica that answered (`x-pagoda-replica`), as the gateway's
    `x-pagoda-upstream` names the upstream: for debugging routing and for the tests."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (b"x-pagoda-replica", replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def application(config: ServerConfig, ray_config: RayServeConfig) -> Any:
    """The bound Ray Serve application (pass it to `serve.run`)."""
    from ray import serve

    cpus = float(config.engine.num_threads or 1)
    if config.engine.distributed_executor == "ray":
        # the replica is rank 0; its other ranks reserve their own CPUs in a placement group
        cpus /= config.engine.num_ranks
    options = ray_config.deployment_options(cpus)
    if ray_config.router == "pow2":
        return serve.deployment(serve.ingress()(PagodaReplica), **options).bind(config)
    from pagoda.cluster.relay_ingress import ingress_deployment

    engines = serve.deployment(PagodaReplica, **options).bind(config)
    return ingress_deployment(ray_config).bind(engines, ray_config.prefix_chars)
