"""Scheduler from tiny configs: budgets, chunked prefill, preemption order, abort."""

from __future__ import annotations

from pagoda.kv_cache.kv_cache_manager import KVCacheManager
from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.output import ModelRunnerOutput
from pagoda.scheduler.request import Request, RequestStatus
from pagoda.scheduler.scheduler import Scheduler, SchedulerConfig

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, chunked=True, caching=False,
         batching="continuous"):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    cfg = SchedulerConfig(budget, max_seqs, chunked, batching)
    return Scheduler(cfg, kv)


def req(rid, n_prompt, params=GREEDY):
    return Request(rid, list(range(1, n_prompt + 1)), params, eos_token_ids=(0,),
                   max_total_tokens=1000)


def step(s: Scheduler, token=7):
    """Schedule and pretend the model sampled `token` for every sampling request."""
    out = s.schedule()
    sampled = {r.req_id: [token] for r in out.scheduled if r.sample}
    step.results = s.update_from_output(out, ModelRunnerOutput(sampled, {}))
    return out


def test_prefill_then_decode_is_one_path():
    s = make()
    s.add_request(req("a", 6))
    out = step(s)
    (a,) = out.scheduled
    assert (a.num_computed_tokens, len(a.token_ids), a.sample) == (0, 6, True)
    assert a.block_ids == [[0, 1]]
    out = step(s)
    (a,) = out.scheduled
    assert (a.num_computed_tokens, a.token_ids, a.sample) == (6, [7], True)


def test_chunked_prefill_mixes_with_decodes():
    s = make(budget=5)
    s.add_request(req("a", 3))
    step(s)  # a prefilled (3 tokens) and sampled
    s.add_request(req("b", 10))
    out = step(s)
    chunks = {r.req_id: (r.num_computed_tokens, len(r.token_ids), r.sample) for r in out.scheduled}
    assert chunks == {"a": (3, 1, True), "b": (0, 4, False)}  # decode first, then a 4-token chunk
    out = step(s)
    chunks = {r.req_id: (r.num_computed_tokens, len(r.token_ids), r.sample) for r in out.scheduled}
    assert chunks == {"a": (4, 1, True), "b": (4, 4, False)}
    out = step(s)
    chunks = {r.req_id: (r.num_computed_tokens, len(r.token_ids), r.sample) for r in out.scheduled}
    assert chunks == {"a": (5, 1, True), "b": (8, 2, True)}


def test_no_chunking_waits_for_budget():
    s = make(budget=5, chunked=False)
    s.add_request(req("a", 8))
    assert s.schedule().is_empty  # never split; with a budget below the prompt it cannot start


def test_max_num_seqs():
    s = make(max_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 2))
    out = step(s)
    assert [r.req_id for r in out.scheduled] == ["a", "b"]
    assert [r.req_id for r in s.waiting] == ["c"]


def test_preempts_newest_and_resumes_it_first():
    s = make(num_blocks=4, block_size=2, budget=64)
    for rid in "ab":
        s.add_request(req(rid, 4))  # 2 blocks each: the pool is full
    step(s)
    assert [r.req_id for r in s.running] == ["a", "b"]
    # the next decode needs a third block for each; b (newest) is preempted so a can grow
    out = step(s)
    assert out.preempted_req_ids == ["b"]
    assert [r.req_id for r in s.running] == ["a"] and s.waiting[0].req_id == "b"
    assert s.requests["b"].status is RequestStatus.WAITING
    assert s.requests["b"].num_computed_tokens == 0
    s.check_integrity()
    s.finish_request("a", "abort")
    out = step(s)  # b resumes, recomputing prompt + the token it had generated
    (b,) = out.scheduled
    assert (b.req_id, b.num_computed_tokens, len(b.token_ids)) == ("b", 0, 5)
    s.check_integrity()


def test_abort_frees_blocks_at_once():
    s = make(num_blocks=8)
    s.add_request(req("a", 10))
    s.add_request(req("b", 3))
    step(s)
    assert s.kv.num_free_blocks == 8 - 3 - 1
    s.finish_request("a", "abort")
    assert s.kv.num_free_blocks == 8 - 1
    s.finish_request("b", "abort")
    s.finish_request("b", "abort")  # twice is harmless
    assert s.kv.num_free_blocks == 8 and s.num_unfinished == 0
    s.check_integrity()


def test_abort_waiting_request():
    s = make(max_seqs=1)
    s.add_request(req("a", 2))
    s.add_request(req("b", 2))
    step(s)
    s.finish_request("b", "abort")
    assert not s.waiting
    s.check_integrity()


def test_stop_conditions():
    s = make()
    s.add_request(req("len", 2, SamplingParams(temperature=0, max_tokens=2)))
    s.add_request(req("eos", 2, SamplingParams(temperature=0, max_tokens=5)))
    out = s.schedule()
    res = s.update_from_output(out, ModelRunnerOutput({"len": [5], "eos": [0]}, {}))
    reasons = {o.req_id: o.finish_reason for o in res}
    assert reasons == {"len": None, "eos": "stop"}
    step(s, token=5)
    res = step.results
    assert [(o.req_id, o.finish_reason) for o in res] == [("len", "length")]
    assert s.num_unfinished == 0 and s.kv.num_free_blocks == 16


def test_min_tokens_ignores_eos_until_reached():
    s = make()
    s.add_request(req("a", 2, SamplingParams(temperature=0, max_tokens=5, min_tokens=2)))
    step(s, token=0)
    assert step.results[0].finish_reason is None  # eos before min_tokens does not stop
    step(s, token=0)
    assert step.results[0].finish_reason == "stop"


def test_static_batching_admits_only_when_batch_is_empty():
    s = make(batching="static")
    s.add_request(req("a", 2, SamplingParams(temperature=0, max_tokens=1)))
    s.add_request(req("b", 2, SamplingParams(temperature=0, max_tokens=3)))
    step(s)  # a finishes after one token
    s.add_request(req("c", 2))
    out = step(s)
    assert [r.req_id for r in out.scheduled] == ["b"]  # c waits for the batch to drain
    step(s)
    out = step(s)
    assert [r.req_id for r in out.scheduled] == ["c"]


def test_prefix_cache_hit_skips_computed_tokens():
    s = make(caching=True, block_size=4)
    s.add_request(req("a", 9))
    step(s)
    s.add_request(req("b", 9))  # same prompt: two full blocks cached
    out = step(s)
    b = next(r for r in out.scheduled if r.req_id == "b")
    assert (b.num_computed_tokens, len(b.token_ids)) == (8, 1)
    assert s.kv.num_hit_tokens == 8 and s.kv.num_queried_tokens == 18


def test_request_waits_one_step_for_a_prefix_being_computed():
    """A prompt whose blocks another request computes this step is admitted next step, as hits."""
    s = make(caching=True, block_size=4)
    s.add_request(req("a", 13))
    s.add_request(Request("b", list(range(1, 13)) + [99, 98], GREEDY, eos_token_ids=(0,),
                          max_total_tokens=1000))
    out = step(s)
    assert [r.req_id for r in out.scheduled] == ["a"]  # b would recompute a's 3 blocks
    out = step(s)
    b = next(r for r in out.scheduled if r.req_id == "b")
    assert (b.num_computed_tokens, len(b.token_ids)) == (12, 2)
    s.check_integrity()


def test_small_shared_prefix_does_not_delay_admission():
    s = make(caching=True, block_size=4)
    s.add_request(req("a", 13))
    s.add_request(Request("b", [1, 2, 3, 4] + list(range(50, 60)), GREEDY, eos_token_ids=(0,),
                          max_total_tokens=1000))  # 4 shared tokens of 14: not worth a step
    out = step(s)
    assert sorted(r.req_id for r in out.scheduled) == ["a", "b"]
    s.check_integrity()


def test_deferral_ends_when_the_computing_request_is_aborted():
    s = make(caching=True, block_size=4, budget=12)
    s.add_request(req("a", 16))
    s.add_request(req("b", 16))
    out = step(s)  # a computes its first 12 tokens; b, with budget left, waits for them
    assert [r.req_id for r in out.scheduled] == ["a"]
    s.finish_request("a", "abort")
    out = step(s)
    b = next(r for r in out.scheduled if r.req_id == "b")
    assert (b.num_computed_tokens, len(b.token_ids)) == (12, 4)  # a's committed blocks are hits
    s.check_integrity()


def test_a_pipeline_splits_the_running_requests_and_skips_those_in_flight():
    s = make()
    for rid in "abcd":
        s.add_request(req(rid, 2))
    first = s.schedule(max_requests=2)  # batch one of two: half the requests
    assert [r.req_id for r in first.scheduled] == ["a", "b"]
    second = s.schedule(busy={"a", "b"}, max_requests=2)
    assert [r.req_id for r in second.scheduled] == ["c", "d"]
    assert s.schedule(busy={"a", "b", "c", "d"}, max_requests=2).is_empty
    s.update_from_output(first, ModelRunnerOutput({"a": [7], "b": [7]}, {}))
    third = s.schedule(busy={"c", "d"}, max_requests=2)  # a and b again, each one token on
    assert [(r.req_id, r.num_computed_tokens, r.token_ids) for r in third.scheduled] == [
        ("a", 2, [7]), ("b", 2, [7])]


def test_requests_in_flight_are_never_preempted():
    s = make(num_blocks=4, block_size=2)
    for rid in "ab":
        s.add_request(req(rid, 4))  # 2 blocks each: the pool is full
    step(s)
    # b (the newest) is in flight: a's growth may not take its blocks, so a waits instead
    out = s.schedule(busy={"b"})
    assert out.preempted_req_ids == ["a"] and out.is_empty
    assert [r.req_id for r in s.running] == ["b"]
    assert s.requests["b"].num_computed_tokens == 4 and len(s.kv.block_ids("b")[0]) == 2
    s.check_integrity()
