"""A Ray Serve request router that sends requests sharing a prompt prefix to the same replica.

A replica that has served a prefix holds its KV blocks in its prefix cache; sending the next
request with that prefix elsewhere recomputes them. The router ranks the replicas by rendezvous
(highest-random-weight) hashing of the request's affinity text, as the gateway's prefix policy
does: when a replica joins or leaves, only the prefixes it owned move.

Load is bounded, as in consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam,
2018): a request goes to the first replica of its ranking whose requests in flight (through this
router) are under `load_factor` times the mean, counting this one. With few prefixes and few
replicas the hash alone can put most of the load on one replica (a measured 0.63x against Ray's
power-of-two choice before this bound); the bound keeps each prefix on its replica until that
replica is busier than its share, then spills to the next in the prefix's ranking (the same
next one every time, so the spilled prefix is cached in at most a few places). Ray then probes
the offered replica's queue and, if it is full (`max_ongoing_requests`), the rest in order.

Requests without affinity text (GET /v1/models, /health, bodies that are not a prompt) take the
power-of-two choice. No FIFO mixin: a routing attempt must serve the request it was made for,
or a request would land on another request's replica.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pagoda.gateway.router import rendezvous_score

DEFAULT_LOAD_FACTOR = 1.25


def bounded_choice(ranked: list[str], in_flight: dict[str, int], load_factor: float) -> int:
    """Index in `ranked` (a prefix's replicas, best first) of the first replica whose load stays
    within `load_factor` x the mean once this request is added."""
    total = sum(in_flight.get(r, 0) for r in ranked) + 1
    cap = max(1, math.ceil(load_factor * total / len(ranked)))
    return next((i for i, r in enumerate(ranked) if in_flight.get(r, 0) < cap), 0)


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, load_factor: float = DEFAULT_LOAD_FACTOR, **_: Any) -> None:
        self.load_factor = load_factor
        self._lock = threading.Lock()  # completion callbacks may run on Ray's threads
        self.in_flight: Counter[ReplicaID] = Counter()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        text = affinity(pending_request)
        if text is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, reverse=True,
                        key=lambda r: rendezvous_score(text, r.replica_id.unique_id))
        with self._lock:
            loads = {r.replica_id.unique_id: self.in_flight[r.replica_id] for r in ranked}
        first = bounded_choice([r.replica_id.unique_id for r in ranked], loads,
                               self.load_factor)
        return [[ranked[first]], ranked[first + 1:] + ranked[:first]]

    # Ray calls these once per dispatched request (whether or not replicas may reject).
    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        with self._lock:
            self.in_flight[replica_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        with self._lock:
            if self.in_flight[replica_id] > 0:
                self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self._lock:
            self.in_flight.pop(replica_id, None)


def affinity(pending_request: PendingRequest | None) -> str | None:
    """The relayed request's affinity text (`relay.RelayedRequest.affinity`), if any."""
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "affinity", None)
