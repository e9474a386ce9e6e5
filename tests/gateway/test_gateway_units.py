"""Pure pieces: the in-memory rate limiter, SSE handling, routing policies, virtual models."""

from __future__ import annotations

import asyncio
import json

from pagoda.gateway.config import (
    HealthConfig,
    PoolConfig,
    RouteRule,
    UpstreamConfig,
    VirtualModelConfig,
)
from pagoda.gateway.model_router import route_virtual
from pagoda.gateway.rate_limit import Limits, MemoryRateLimiter
from pagoda.gateway.response_cache import MemoryResponseCache, cache_key, is_cacheable
from pagoda.gateway.router import (
    LeastOutstanding,
    PrefixAffinity,
    RoundRobin,
    affinity_text,
    prompt_text,
)
from pagoda.gateway.sse import (
    SSESplitter,
    StreamAssembler,
    can_rechunk,
    chunks_from_response,
    event_data,
)
from pagoda.gateway.upstream import UpstreamPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_memory_limiter_sliding_window_requests():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    limits = Limits(requests_per_minute=3)
    verdicts = [run(limiter.acquire("k", limits, f"l{i}")).allowed for i in range(5)]
    assert verdicts == [True, True, True, False, False]
    clock.now += 30
    d = run(limiter.acquire("k", limits, "x"))
    assert not d.allowed and d.reason == "requests"
    assert abs(d.reset_requests_s - 30) < 1e-6 and d.headers()["retry-after"] == "30"
    clock.now += 30.001  # the first three fall out of the window
    assert run(limiter.acquire("k", limits, "y")).allowed


def test_memory_limiter_tokens_and_concurrency():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    limits = Limits(tokens_per_minute=100, max_concurrent=2)
    assert run(limiter.acquire("k", limits, "a")).allowed
    assert run(limiter.acquire("k", limits, "b")).allowed
    d = run(limiter.acquire("k", limits, "c"))
    assert d.reason == "concurrency" and d.headers()["retry-after"] == "1"
    run(limiter.release("k", "a"))
    run(limiter.release("k", "a"))  # idempotent
    run(limiter.record_tokens("k", "a", 60))
    clock.now += 10
    run(limiter.record_tokens("k", "b", 50))
    run(limiter.release("k", "b"))
    d = run(limiter.acquire("k", limits, "d"))
    # 110 >= 100 used; dropping the first event (60 at t=0) gets under the limit at t=60
    assert d.reason == "tokens" and abs(d.reset_tokens_s - 50) < 1e-6
    assert d.headers()["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 50.001
    assert run(limiter.acquire("k", limits, "e")).allowed


def test_limits_are_per_key():
    limiter = MemoryRateLimiter(Clock())
    limits = Limits(requests_per_minute=1)
    assert run(limiter.acquire("a", limits, "1")).allowed
    assert run(limiter.acquire("b", limits, "2")).allowed
    assert not run(limiter.acquire("a", limits, "3")).allowed


def test_sse_splitter_handles_split_events_and_crlf():
    splitter = SSESplitter()
    assert splitter.feed(b"data: {\"a\"") == []
    assert splitter.feed(b": 1}\r\n\r\ndata: [DO") == [b'data: {"a": 1}\n\n']
    assert splitter.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"]
    assert event_data(b"event: x\ndata: 1\ndata: 2\n\n") == b"1\n2"
    assert event_data(b": comment\n\n") is None


def test_assembler_and_chunks_round_trip():
    body = {
        "id": "c1", "created": 5, "model": "m", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 150},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    events = chunks_from_response(body, chat=True, include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    assembler = StreamAssembler(chat=True)
    for event in events[:-1]:
        assembler.add(json.loads(event_data(event)))
    assert assembler.complete and assembler.body() == body
    plain = {"id": "c2", "created": 1, "model": "m", "object": "text_completion",
             "choices": [{"index": 0, "text": "hello", "logprobs": None,
                          "finish_reason": "length"}]}
    events = chunks_from_response(plain, chat=False, include_usage=True)
    assembler = StreamAssembler(chat=False)
    for event in events[:-1]:
        assembler.add(json.loads(event_data(event)))
    assert assembler.body() == plain


def test_only_text_answers_can_be_rechunked():
    text = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "logprobs": None}]}
    assert can_rechunk(text)
    tool = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                 "tool_calls": [{"id": "t1"}]}}]}
    assert not can_rechunk(tool)
    assert not can_rechunk({"choices": [{"index": 0, "text": "x", "logprobs": {"tokens": []}}]})
    assert not can_rechunk({"error": {}})


def test_assembler_refuses_tool_calls():
    assembler = StreamAssembler(chat=True)
    assembler.add({"choices": [{"index": 0, "delta": {"tool_calls": [{"id": "t"}]}}]})
    assert not assembler.complete


def test_cache_key_ignores_transport_fields_only():
    body = {"model": "m", "prompt": "p", "temperature": 0}
    base = cache_key("/v1/completions", "m", body)
    assert base == cache_key("/v1/completions", "m", {**body, "stream": True, "user": "u"})
    assert base != cache_key("/v1/completions", "m", {**body, "max_tokens": 5})
    assert base != cache_key("/v1/chat/completions", "m", body)
    assert is_cacheable(body) and is_cacheable({"seed": 3}) and not is_cacheable({})
    assert not is_cacheable({"temperature": 0.7})
    assert not is_cacheable({"temperature": False})  # == 0 in Python; not a temperature


def test_cache_key_covers_constraints_and_their_key_order():
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"x": {}, "y": {}}}}}
    swapped = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"y": {}, "x": {}}}}}
    base = cache_key("/v1/chat/completions", "m", body)
    with_fmt = cache_key("/v1/chat/completions", "m", {**body, "response_format": fmt})
    assert base != with_fmt
    # property order is the order the output follows: a different answer, a different entry
    assert with_fmt != cache_key("/v1/chat/completions", "m", {**body, "response_format": swapped})
    assert base != cache_key("/v1/chat/completions", "m", {**body, "tools": [{"type": "function"}]})
    assert with_fmt == cache_key("/v1/chat/completions", "m",
                                 {"response_format": fmt, **body})  # top-level order: no matter


def test_memory_cache_ttl_and_lru():
    clock = Clock()
    cache = MemoryResponseCache(ttl_s=10, max_entries=2, clock=clock)
    run(cache.put("a", b"1"))
    run(cache.put("b", b"2"))
    assert run(cache.get("a")) == b"1"  # a becomes most recent
    run(cache.put("c", b"3"))  # evicts b
    assert run(cache.get("b")) is None and run(cache.get("a")) == b"1"
    clock.now += 10
    assert run(cache.get("a")) is None


def pool_of(n: int, clock: Clock | None = None) -> UpstreamPool:
    ups = tuple(UpstreamConfig(f"http://127.0.0.1:{9000 + i}", name=f"u{i}") for i in range(n))
    health = HealthConfig(eject_after_failures=2, eject_s=5)
    return UpstreamPool(PoolConfig("m", ups), health, clock or Clock())


def test_round_robin_and_least_outstanding():
    pool = pool_of(3)
    rr = RoundRobin()
    assert [rr.choose(pool.candidates(), "").name for _ in range(6)] == ["u0", "u1", "u2"] * 2
    pool.upstreams[0].num_outstanding = 2
    pool.upstreams[1].num_outstanding = 1
    pool.upstreams[2].num_outstanding = 1
    lo = LeastOutstanding()
    assert {lo.choose(pool.candidates(), "").name for _ in range(4)} == {"u1", "u2"}


def test_prefix_affinity_is_sticky_and_spreads_and_falls_back():
    pool = pool_of(4)
    policy = PrefixAffinity(prefix_chars=16, max_outstanding=2)
    owner = policy.choose(pool.candidates(), "shared-prefix-123 then anything")
    for suffix in ("a", "b", "c" * 100):
        assert policy.choose(pool.candidates(), "shared-prefix-123" + suffix) is owner
    owners = {policy.choose(pool.candidates(), f"prompt number {i}").name for i in range(40)}
    assert len(owners) >= 3
    owner.num_outstanding = 2  # overloaded: next in this prefix's ranking, then stable
    other = policy.choose(pool.candidates(), "shared-prefix-123")
    assert other is not owner
    owner.num_outstanding = 0
    assert policy.choose(pool.candidates(), "shared-prefix-123") is owner


def test_affinity_text_leaves_out_the_newest_chat_message():
    system = {"role": "system", "content": "short"}
    a = {"messages": [system, {"role": "user", "content": "question one"}]}
    b = {"messages": [system, {"role": "user", "content": "another question"}]}
    assert affinity_text(a) == affinity_text(b) == "system: short\n"
    single = {"messages": [{"role": "user", "content": "hello"}]}
    assert affinity_text(single) == "user: hello\n"
    assert affinity_text({"prompt": "abc"}) == "abc"


def test_passive_ejection_and_panic_mode():
    clock = Clock()
    pool = pool_of(2, clock)
    u0 = pool.upstreams[0]
    assert not pool.record_failure(u0)
    assert pool.record_failure(u0)  # second consecutive failure ejects
    assert [u.name for u in pool.candidates()] == ["u1"]
    pool.upstreams[1].healthy = False  # nothing available: every upstream is a candidate
    assert [u.name for u in pool.candidates()] == ["u0", "u1"]
    pool.upstreams[1].healthy = True
    clock.now += 5
    assert [u.name for u in pool.candidates()] == ["u0", "u1"]


def test_virtual_model_rules():
    vm = VirtualModelConfig("auto", default="small", rules=(
        RouteRule("large", min_prompt_chars=100),
        RouteRule("large", min_max_tokens=500),
        RouteRule("code", keywords=("Python", "traceback")),
    ))
    assert route_virtual(vm, {"prompt": "hi"}) == "small"
    assert route_virtual(vm, {"prompt": "x" * 100}) == "large"
    assert route_virtual(vm, {"prompt": "hi", "max_tokens": 500}) == "large"
    assert route_virtual(vm, {"prompt": "hi", "max_completion_tokens": 499}) == "small"
    chat = {"messages": [{"role": "user", "content": "fix my python TRACEBACK"}]}
    assert route_virtual(vm, chat) == "code"
    assert prompt_text(chat) == "user: fix my python TRACEBACK\n"
