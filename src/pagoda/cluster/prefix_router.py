"""A Ray Serve request router that sends requests sharing a prompt prefix to the same replica.

A replica that has served a prefix holds its KV blocks in its prefix cache; sending the next
request with that prefix elsewhere recomputes them. The router ranks the replicas by rendezvous
(highest-random-weight) hashing of the request's affinity text, as the gateway's prefix policy
does: when a replica joins or leaves, only the prefixes it owned move.

Load still wins over affinity: the first-ranked replica is offered alone only while it has fewer
than `imbalance` more requests in flight (through this router) than the least busy candidate;
otherwise the request goes to Ray's power-of-two choice. Ray then probes the offered replicas'
queues and skips one that is full (`max_ongoing_requests`), trying the next rank.

Requests without affinity text (GET /v1/models, /health, bodies that are not a prompt) take the
power-of-two choice. No FIFO mixin: a routing attempt must serve the request it was made for,
or a request would land on another request's replica.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

DEFAULT_IMBALANCE = 8


def rendezvous_score(text: str, replica: str) -> bytes:
    key = text.encode("utf-8", "surrogatepass") + b"\0" + replica.encode()
    return hashlib.blake2b(key, digest_size=8).digest()


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **_: Any) -> None:
        self.imbalance = imbalance
        self._lock = threading.Lock()  # completion callbacks may run on Ray's threads
        self.in_flight: Counter[ReplicaID] = Counter()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        text = affinity(pending_request)
        if text is not None and len(candidate_replicas) > 1:
            ranked = sorted(candidate_replicas, reverse=True,
                            key=lambda r: rendezvous_score(text, r.replica_id.unique_id))
            with self._lock:
                least = min(self.in_flight[r.replica_id] for r in ranked)
                busy = self.in_flight[ranked[0].replica_id] - least >= self.imbalance
            if not busy:
                return [[ranked[0]], ranked[1:]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

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
