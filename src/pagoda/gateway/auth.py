"""API-key authentication against salted PBKDF2 hashes kept in the config.

Invariants:
- The plaintext key exists only in the request being served; nothing here logs it or stores it.
- Hash comparison is constant time (`hmac.compare_digest`) and every configured key is tried, so the
  time taken does not reveal which key (if any) matched.
- PBKDF2 is deliberately slow, so verdicts are memoised under an HMAC of the presented key with a
  per-process random secret: the memo never holds the key or a hash anyone else could recompute.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict

from pagoda.gateway.config import KeyConfig

DEFAULT_ITERATIONS = 100_000
_MEMO_SIZE = 4096
# Unknown tokens cost a PBKDF2 per configured key; at most this many such checks run at once, so
# a flood of made-up keys can take at most this many CPU threads from the gateway.
_MAX_CONCURRENT_CHECKS = 2


def hash_key(key: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return `pbkdf2_sha256$<iterations>$<salt hex>$<digest hex>` for the config's `hash` field."""
    if not key:
        raise ValueError("an API key must not be empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_key(key: str, encoded: str) -> bool:
    _, iterations, salt_hex, digest_hex = encoded.split("$")
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), bytes.fromhex(salt_hex), int(iterations))
    return hmac.compare_digest(digest, bytes.fromhex(digest_hex))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyStore:
    """Maps a presented secret to the KeyConfig whose hash it matches."""

    def __init__(self, keys: tuple[KeyConfig, ...]) -> None:
        self._keys = keys
        self._memo_secret = secrets.token_bytes(32)
        # fingerprint -> matched key name ("" for no match), least recently used first
        self._memo: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()
        self._checks: asyncio.Semaphore | None = None  # created inside the event loop

    def _fingerprint(self, token: str) -> bytes:
        return hmac.new(self._memo_secret, token.encode(), hashlib.sha256).digest()

    def _by_name(self, name: str) -> KeyConfig | None:
        return next((k for k in self._keys if k.name == name), None) if name else None

    def authenticate(self, token: str | None) -> KeyConfig | None:
        """Blocking: a memo miss costs one PBKDF2 per configured key."""
        if not token:
            return None
        fingerprint = self._fingerprint(token)
        with self._lock:
            name = self._memo.get(fingerprint)
        if name is None:
            name = ""
            for key in self._keys:  # no early exit: constant work whichever key matches
                if verify_key(token, key.hash) and not name:
                    name = key.name
            with self._lock:
                self._memo[fingerprint] = name
                if len(self._memo) > _MEMO_SIZE:
                    self._memo.popitem(last=False)
        return self._by_name(name)

    async def authenticate_async(self, token: str | None) -> KeyConfig | None:
        """Like `authenticate`, but a memo miss runs in a worker thread, off the event loop."""
        if not token:
            return None
        with self._lock:
            name = self._memo.get(self._fingerprint(token))
            if name is not None:
                self._memo.move_to_end(self._fingerprint(token))
        if name is not None:
            return self._by_name(name)
        if self._checks is None:
            self._checks = asyncio.Semaphore(_MAX_CONCURRENT_CHECKS)
        async with self._checks:
            return await asyncio.to_thread(self.authenticate, token)
