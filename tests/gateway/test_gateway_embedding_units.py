"""Units of the embedding path: request parsing, cache keys, the in-memory LRU, the vector codec,
the config section, and keys without limits never touching Redis."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from pagoda.gateway.config import ConfigError
from pagoda.gateway.embedding_cache import MemoryEmbeddingCache, embedding_key
from pagoda.gateway.embedding_request import (
    EmbeddingRequest,
    InvalidField,
    parse_embedding_request,
)
from pagoda.gateway.embedding_vectors import (
    MalformedEmbeddings,
    decode_embeddings,
    embeddings_body,
    encode_vector,
)
from pagoda.gateway.rate_limit import Limits
from pagoda.gateway.redis_state import RedisRateLimiter
from tests.gateway.gateway_harness import free_port, make_config


def parsed(**body) -> EmbeddingRequest:
    out = parse_embedding_request({"model": "e", **body})
    assert isinstance(out, EmbeddingRequest), out
    return out


def test_every_input_shape_becomes_a_tuple_of_inputs():
    assert parsed(input="a").inputs == ("a",)
    assert parsed(input=["a", "b"]).inputs == ("a", "b")
    assert parsed(input=[1, 2, 3]).inputs == ((1, 2, 3),)
    assert parsed(input=[[1, 2], [3]]).inputs == ((1, 2), (3,))
    r = parsed(input="a", encoding_format=None, dimensions=4, truncate_prompt_tokens=-1,
               user="u", extra=1, another=None)
    assert r.encoding_format == "float" and r.vector_options == (4, -1)
    assert r.unknown_fields == ("another", "extra")
    bad = parse_embedding_request({"model": "e", "input": ["a", ["b"]]})
    assert bad == InvalidField("input[1]", "'input[1]' must be a string, like input[0].")


def test_keys_separate_what_changes_a_vector_and_nothing_else():
    base = embedding_key("e", "up", (None, None), "12")
    assert base == embedding_key("e", "up", (None, None), "12")
    others = [
        embedding_key("e", "up", (None, None), (12,)),  # text "12" is not token 12
        embedding_key("e", "up", (None, None), "12 "),
        embedding_key("f", "up", (None, None), "12"),  # another pool
        embedding_key("e", "up2", (None, None), "12"),  # another model behind the pool
        embedding_key("e", "up", (8, None), "12"),
        embedding_key("e", "up", (None, 8), "12"),
    ]
    assert len({base, *others}) == 1 + len(others)


async def test_memory_cache_is_an_lru_bounded_by_bytes_with_ttls():
    now = [0.0]
    key_bytes = 64
    cache = MemoryEmbeddingCache(max_bytes=3 * (key_bytes + 16), clock=lambda: now[0])
    k = [f"{i:064d}" for i in range(5)]
    await cache.put_many([(k[0], b"a" * 16), (k[1], b"b" * 16), (k[2], b"c" * 16)], ttl_s=10)
    assert await cache.get_many([k[0], k[3]]) == [b"a" * 16, None]  # k0 is now most recent
    await cache.put_many([(k[3], b"d" * 16)], ttl_s=1)
    assert await cache.get_many(k[:4]) == [b"a" * 16, None, b"c" * 16, b"d" * 16]
    assert cache.num_bytes == 3 * (key_bytes + 16) and len(cache) == 3
    now[0] = 1.0  # k3's TTL is up, the others' are not
    assert await cache.get_many([k[3], k[2]]) == [None, b"c" * 16]
    assert len(cache) == 2 and cache.num_bytes == 2 * (key_bytes + 16)
    await cache.put_many([(k[4], b"x" * 1000)], ttl_s=10)  # bigger than the whole budget
    assert await cache.get_many([k[4]]) == [None] and len(cache) == 2
    await cache.put_many([(k[2], b"C" * 8)], ttl_s=10)  # replacing an entry frees its old bytes
    assert cache.num_bytes == 2 * key_bytes + 16 + 8


def test_vectors_round_trip_and_malformed_answers_are_refused():
    vector = np.asarray([0.1, -2.5, 3e-8], dtype="<f4")
    raw = vector.tobytes()
    b64 = encode_vector(raw, "base64")
    assert base64.b64decode(b64) == raw
    assert encode_vector(raw, "float") == [float(x) for x in vector]
    payload = {"data": [{"index": 1, "embedding": vector.tolist()}, {"index": 0, "embedding": b64}]}
    assert decode_embeddings(payload, 2) == [raw, raw]
    good = {"index": 0, "embedding": b64}
    for bad, num_inputs in [
        ({"data": []}, 1),
        ({"data": [good]}, 2),
        ({"data": [{"index": 0, "embedding": "%%"}]}, 1),
        ({"data": [{"index": 0, "embedding": "AAA="}]}, 1),  # 2 bytes: not a float32
        ({"data": [{"index": 0, "embedding": []}]}, 1),
        ({"data": [{"index": 0, "embedding": ["x"]}]}, 1),
        ({"data": [{"index": 3, "embedding": b64}]}, 1),
        ({"data": [good, good]}, 2),  # index 0 twice, none for 1
        ([good], 1),
    ]:
        with pytest.raises(MalformedEmbeddings):
            decode_embeddings(bad, num_inputs)
    body = embeddings_body([raw], "base64", "e", 3)
    assert body == {"object": "list", "model": "e", "usage": {"prompt_tokens": 3,
                    "total_tokens": 3}, "data": [{"object": "embedding", "index": 0,
                                                  "embedding": b64}]}


def test_embedding_cache_config():
    upstreams = {"e": ["http://127.0.0.1:9"]}
    config = make_config(upstreams)
    assert config.embedding_cache.enabled and config.embedding_cache.ttl_for("e") == 7 * 86400
    config = make_config(upstreams, embedding_cache={"ttl_s": 60, "model_ttl_s": {"e": 5}})
    assert config.embedding_cache.ttl_for("e") == 5
    for section, message in [
        ({"model_ttl_s": {"nope": 5}}, "embedding_cache.model_ttl_s: unknown models ['nope']"),
        ({"model_ttl_s": {"e": 0}}, "embedding_cache: model_ttl_s['e'] must be a positive"),
        ({"ttl_s": "long"}, "embedding_cache.ttl_s: expected a number, got 'long'"),
        ({"max_bytes": 0}, "embedding_cache: max_bytes must be a positive"),
        ({"max_entries": 5}, "embedding_cache: unknown field(s) ['max_entries']"),
    ]:
        with pytest.raises(ConfigError) as info:
            make_config(upstreams, embedding_cache=section)
        assert message in str(info.value)


async def test_a_key_without_limits_never_touches_redis():
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    limiter = RedisRateLimiter(dead, "t:")
    try:
        decision = await limiter.acquire("free", Limits(), "l1")
        assert decision.allowed and decision.headers() == {}
        await limiter.record_tokens("free", "l1", 10)
        await limiter.finish("free", "l1", 10)
        await limiter.release("free", "l1")
        with pytest.raises((RedisError, OSError)):
            await limiter.acquire("limited", Limits(requests_per_minute=5), "l2")
    finally:
        await dead.aclose()
