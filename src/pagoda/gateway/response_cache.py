"""Exact-match response cache for deterministic requests.

A request is cacheable only if its output is a function of its input: `temperature` is 0 or a `seed`
is fixed. The key hashes the endpoint, the public model name and the request body normalised as
JSON (top-level fields sorted), with the fields that change only the transport (`stream`,
`stream_options`) or only bookkeeping (`user`) removed — so a streamed and a non-streamed request
share one entry. Every field that shapes the output (`response_format`, `tools`, `logit_bias`...)
is part of the key.

Values are always the complete non-streaming response body (JSON bytes); streamed answers are
assembled into that form before they are stored (see sse.py) and re-chunked when served.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

_TRANSPORT_FIELDS = ("stream", "stream_options", "user")


def is_cacheable(body: dict[str, Any]) -> bool:
    temperature = body.get("temperature")  # false == 0 in Python; the upstream refuses it
    greedy = temperature == 0 and not isinstance(temperature, bool)
    return greedy or body.get("seed") is not None


def cache_key(endpoint: str, model: str, body: dict[str, Any]) -> str:
    normalized = {k: v for k, v in body.items() if k not in _TRANSPORT_FIELDS and v is not None}
    normalized["model"] = model
    # Top-level fields in sorted order, values as sent: key order inside a value can matter
    # (a JSON schema's property order is the order the constrained output follows).
    fields = [[k, normalized[k]] for k in sorted(normalized)]
    blob = json.dumps([endpoint, fields], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache(ABC):
    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def put(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None:
        return None


class MemoryResponseCache(ResponseCache):
    """LRU bounded by entry count; an entry older than `ttl_s` is never returned."""

    def __init__(self, ttl_s: float, max_entries: int, clock=time.monotonic) -> None:
        assert ttl_s > 0 and max_entries > 0
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expiry, v)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def put(self, key: str, value: bytes) -> None:
        self._entries[key] = (self._clock() + self._ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
