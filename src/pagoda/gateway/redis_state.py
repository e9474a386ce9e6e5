"""Redis backends for rate limits, the response cache and the embedding cache, shared by several
gateway instances.

All borrow one `redis.asyncio.Redis` client that the app owns and closes.

Each admission is one Lua script, so the check-and-record of all three limits is atomic across
gateways. Times come from the Redis server's clock (`TIME`), never the gateways', so instances with
skewed clocks still agree on the window. Per key (members unique per request: its lease id):
- `<prefix>rl:<key>:req`  sorted set of admitted requests, score = admission time (ms)
- `<prefix>rl:<key>:tok`  sorted set of token events "<lease id>:<count>", score = record time (ms)
- `<prefix>rl:<key>:sum`  the sum of the counts in `tok` (kept in step by both scripts, so an
                          admission costs O(expired events), not O(events in the window))
- `<prefix>rl:<key>:run`  sorted set of in-flight leases, score = lease expiry (ms)
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from pagoda.gateway.embedding_cache import EmbeddingCache
from pagoda.gateway.rate_limit import LEASE_S, WINDOW_S, Decision, Limits, RateLimiter
from pagoda.gateway.response_cache import ResponseCache

# Drops token events older than the window from `tok` and their counts from `sum`; returns the
# tokens left in the window. Recounts from `tok` if `sum` was lost (e.g. evicted).
_EXPIRE_TOKENS = """
local function count(member) return tonumber(string.match(member, ':(%d+)$')) end
local function expire_tokens(tok, sum, now, window)
  local expired = redis.call('ZRANGEBYSCORE', tok, '-inf', now - window)
  if #expired > 0 then
    local gone = 0
    for i = 1, #expired do gone = gone + count(expired[i]) end
    redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
    redis.call('DECRBY', sum, gone)
  end
  local used = tonumber(redis.call('GET', sum) or '-1')
  if used < 0 then
    used = 0
    for _, member in ipairs(redis.call('ZRANGE', tok, 0, -1)) do used = used + count(member) end
    redis.call('SET', sum, used, 'PX', window)
  end
  return used
end
"""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: req, tok, run, sum.
# ARGV: rpm, tpm, max_concurrent (-1 = unlimited), window ms, lease id, lease ms
_ACQUIRE = _EXPIRE_TOKENS + _NOW + """
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, lease = tonumber(ARGV[4]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local nreq = redis.call('ZCARD', KEYS[1])
local ninflight = redis.call('ZCARD', KEYS[3])
local used = expire_tokens(KEYS[2], KEYS[4], now, window)
local reason = ''
if maxc >= 0 and ninflight >= maxc then reason = 'concurrency'
elseif rpm >= 0 and nreq >= rpm then reason = 'requests'
elseif tpm >= 0 and used >= tpm then reason = 'tokens' end
if reason == '' then
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('ZADD', KEYS[3], now + lease, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], window)
  redis.call('PEXPIRE', KEYS[3], lease)
  nreq = nreq + 1
end
local req_reset = 0
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #oldest > 0 then req_reset = tonumber(oldest[2]) + window - now end
local tok_reset = 0
if tpm >= 0 and used >= tpm then  -- over the limit: walk the oldest events until under it
  local left = used
  local events = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #events, 2 do
    left = left - count(events[i])
    if left < tpm then tok_reset = tonumber(events[i + 1]) + window - now break end
  end
end
return {reason, nreq, used, req_reset, tok_reset}
"""

# KEYS: tok, sum.  ARGV: member, count, window ms
_RECORD_TOKENS = _EXPIRE_TOKENS + _NOW + """
local window = tonumber(ARGV[3])
expire_tokens(KEYS[1], KEYS[2], now, window)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], window)
return 1
"""


# KEYS: tok, sum, run.  ARGV: member, count (0 = none), window ms, lease id
_FINISH = _EXPIRE_TOKENS + _NOW + """
local window = tonumber(ARGV[3])
if tonumber(ARGV[2]) > 0 then
  expire_tokens(KEYS[1], KEYS[2], now, window)
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[1], window)
  redis.call('PEXPIRE', KEYS[2], window)
end
redis.call('ZREM', KEYS[3], ARGV[4])
return 1
"""


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


class RedisRateLimiter(RateLimiter):
    """A key with no limit at all has nothing to check or count, so it never touches Redis: its
    requests keep working (its caches missing) while Redis is down. Limits are per key name and
    fixed for the process, so a name seen unlimited once is unlimited for every later call."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._unlimited: set[str] = set()  # key names with no limits
        self._acquire = redis.register_script(_ACQUIRE)
        self._record = redis.register_script(_RECORD_TOKENS)
        self._finish = redis.register_script(_FINISH)

    def _keys(self, key: str) -> list[str]:
        base = f"{self._prefix}rl:{key}:"
        return [base + "req", base + "tok", base + "run", base + "sum"]

    async def acquire(self, key: str, limits: Limits, lease_id: str) -> Decision:
        if limits == Limits():
            self._unlimited.add(key)
            return Decision(allowed=True, reason="", limits=limits, num_requests=0, num_tokens=0,
                            reset_requests_s=0.0, reset_tokens_s=0.0)
        args = [
            _or_minus_one(limits.requests_per_minute),
            _or_minus_one(limits.tokens_per_minute),
            _or_minus_one(limits.max_concurrent),
            int(WINDOW_S * 1000),
            lease_id,
            int(LEASE_S * 1000),
        ]
        reason, nreq, used, req_reset, tok_reset = await self._acquire(self._keys(key), args)
        reason = reason.decode() if isinstance(reason, bytes) else reason
        return Decision(
            allowed=not reason,
            reason=reason,
            limits=limits,
            num_requests=int(nreq),
            num_tokens=int(used),
            reset_requests_s=int(req_reset) / 1000,
            reset_tokens_s=int(tok_reset) / 1000,
        )

    async def release(self, key: str, lease_id: str) -> None:
        if key in self._unlimited:
            return
        await self._redis.zrem(self._keys(key)[2], lease_id)

    async def record_tokens(self, key: str, lease_id: str, num_tokens: int) -> None:
        if num_tokens > 0 and key not in self._unlimited:
            keys = self._keys(key)
            member = f"{lease_id}:{num_tokens}"
            await self._record([keys[1], keys[3]], [member, num_tokens, int(WINDOW_S * 1000)])

    async def finish(self, key: str, lease_id: str, num_tokens: int) -> None:
        if key in self._unlimited:
            return
        keys = self._keys(key)
        args = [f"{lease_id}:{num_tokens}", max(0, num_tokens), int(WINDOW_S * 1000), lease_id]
        await self._finish([keys[1], keys[3], keys[2]], args)


class RedisResponseCache(ResponseCache):
    """Entries are plain strings with a TTL; Redis's own eviction policy bounds memory."""

    def __init__(self, redis: Redis, prefix: str, ttl_s: float) -> None:
        self._redis = redis
        self._prefix = prefix + "cache:"
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def get(self, key: str) -> bytes | None:
        return await self._redis.get(self._prefix + key)

    async def put(self, key: str, value: bytes) -> None:
        await self._redis.set(self._prefix + key, value, px=self._ttl_ms)


class RedisEmbeddingCache(EmbeddingCache):
    """`<prefix>emb:<key>` strings holding float32 bytes, each with its model's TTL. A request's
    lookups are one MGET and its stores one pipeline (no transaction: each entry stands alone)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix + "emb:"

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return list(await self._redis.mget([self._prefix + key for key in keys]))

    async def put_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        if not entries:
            return
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in entries:
                pipe.set(self._prefix + key, value, px=ttl_ms)
            await pipe.execute()
