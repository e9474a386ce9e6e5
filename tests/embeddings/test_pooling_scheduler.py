from __future__ import annotations

from pagoda.scheduler.pooling_scheduler import PoolingRequest, PoolingScheduler


def request(name: str, n: int) -> PoolingRequest:
    return PoolingRequest(name, None, [1] * n, 0.0)


def test_packs_in_arrival_order_under_the_token_budget_and_seq_cap():
    s = PoolingScheduler(max_num_batched_tokens=10, max_num_seqs=3)
    for name, n in [("a", 4), ("b", 4), ("c", 4), ("d", 1), ("e", 1), ("f", 1), ("g", 1)]:
        s.add(request(name, n))
    steps = []
    while s.num_waiting:
        steps.append([r.req_id for r in s.schedule()])
    # c does not fit after a+b (12 > 10) and is not overtaken by the short d
    assert steps == [["a", "b"], ["c", "d", "e"], ["f", "g"]]


def test_a_request_as_long_as_the_budget_runs_alone():
    s = PoolingScheduler(max_num_batched_tokens=8, max_num_seqs=4)
    s.add(request("long", 8))
    s.add(request("short", 1))
    assert [r.req_id for r in s.schedule()] == ["long"]
    assert [r.req_id for r in s.schedule()] == ["short"]
    assert s.schedule() == []


def test_abort_removes_only_waiting_requests():
    s = PoolingScheduler(16, 4)
    s.add(request("a", 2))
    s.add(request("b", 2))
    assert s.abort("a") and not s.abort("a") and not s.abort("zzz")
    assert [r.req_id for r in s.schedule()] == ["b"]
