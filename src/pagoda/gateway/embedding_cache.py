"""The embedding cache: one entry per input, so requests that share some inputs share work.

Key: SHA-256 of (pool name, the model name sent upstream, the options that change a vector —
`dimensions`, `truncate_prompt_tokens` —, the input as a string or a list of token ids). The text
"12" and the token ids [12] are different inputs and different keys. `encoding_format` and `user`
are not in the key: they do not change the vector.

Value: the vector as little-endian float32 bytes, exactly what the upstream sent in base64, so a
`float` and a `base64` request are served from one entry and a hit is bit-identical to a miss.

Entries do not go stale (a vector is a function of the weights and the input), so TTLs are long.
Serving other weights under the same pool and `upstream_model` names would serve the old vectors
until they expire: rename either, or change `redis_prefix`, when the weights change.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

from pagoda.gateway.embedding_request import EmbeddingInput


def embedding_key(
    pool: str, upstream_model: str, options: Sequence[int | None], item: EmbeddingInput
) -> str:
    value = item if isinstance(item, str) else list(item)
    blob = json.dumps([pool, upstream_model, list(options), value], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class EmbeddingCache(ABC):
    """Batched by design: a request's inputs are looked up, and its misses stored, in one call
    (one round trip for Redis), whatever their number."""

    @abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One value (or None) per key, in the keys' order."""

    @abstractmethod
    async def put_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None: ...


class MemoryEmbeddingCache(EmbeddingCache):
    """LRU bounded by bytes (keys + vectors), since vector sizes differ by model; an entry past
    its expiry is never returned.

    Invariant: `num_bytes` == the sum of `_cost` over the entries, and <= `max_bytes` after every
    call (an entry bigger than the whole budget is not stored)."""

    def __init__(self, max_bytes: int, clock=time.monotonic) -> None:
        assert max_bytes > 0
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expiry, v)
        self.num_bytes = 0

    @staticmethod
    def _cost(key: str, value: bytes) -> int:
        return len(key) + len(value)

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.num_bytes -= self._cost(key, value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] <= now:
                self._drop(key)
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
            out.append(entry[1] if entry is not None else None)
        return out

    async def put_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        expiry = self._clock() + ttl_s
        for key, value in entries:
            if key in self._entries:
                self._drop(key)
            cost = self._cost(key, value)
            if cost > self._max_bytes:
                continue
            self._entries[key] = (expiry, value)
            self.num_bytes += cost
        while self.num_bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)
