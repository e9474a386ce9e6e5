"""The adaptive speculation policy: how deep each request drafts, from its measured acceptance."""

from __future__ import annotations

import pytest

from pagoda.engine.config import DEFAULT_NGRAM, EngineConfig
from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.request import Request
from pagoda.scheduler.spec_policy import SpecDecodeConfig, SpecPolicy


def request(req_id: str = "r", **params) -> Request:
    params.setdefault("max_tokens", 1000)
    return Request(req_id, list(range(10)), SamplingParams(**params), max_total_tokens=4096,
                   output_token_ids=[1])


def policy(k: int = 16, floor: float = 0.05, max_batch: int = 8) -> SpecPolicy:
    return SpecPolicy(SpecDecodeConfig(num_speculative_tokens=k, depth_floor=floor,
                                       max_batch=max_batch))


def test_depth_follows_the_measured_acceptance():
    p, accepting, rejecting = policy(), request("a"), request("r")
    first = p.num_spec_tokens(accepting, 1, 100)
    for _ in range(6):
        p.record("a", 8, 8)
        p.record("r", 8, 1)  # the first draft accepted, the second rejected: a = 1/2
    assert p.num_spec_tokens(accepting, 1, 100) == 16 > first  # capped at k
    # a^j >= 0.05 while j <= 4 (0.5^4 = 0.0625), with a slightly above 1/2 from the prior
    assert p.num_spec_tokens(rejecting, 1, 100) == 4
    s = p.stats
    assert s.num_drafts == 12 and s.num_draft_tokens == 96 and s.num_accepted_tokens == 54
    assert s.accepted_per_pos[0] == 12 and s.accepted_per_pos[1:8] == [6] * 7
    assert s.accepted_per_pos[8:] == [0] * 8


def test_a_request_that_never_accepts_only_probes():
    p, r = policy(), request()
    for _ in range(20):
        k = p.num_spec_tokens(r, 1, 100)
        p.record(r.req_id, k, 0)
    depths = [p.num_spec_tokens(r, 1, 100) for _ in range(16)]
    assert sorted(set(depths)) == [0, 1] and depths.count(1) == 2


def test_alone_prompt_lookup_drafts_deeper_and_never_only_probes():
    """With one request running, the solo floor applies and a request that stopped accepting
    keeps drafting by the acceptance model (its wrong drafts take rows from no one); with two
    running, the shared floor and probing are back."""
    p = SpecPolicy(SpecDecodeConfig(num_speculative_tokens=16, depth_floor=0.05,
                                    solo_depth_floor=0.01))
    r = request()
    for _ in range(6):
        p.record(r.req_id, 8, 1)  # a = 1/2 (slightly above, from the prior)
    # 0.5^j >= 0.01 while j <= 6; >= 0.05 while j <= 4
    assert p.num_spec_tokens(r, 1, 100) == 6 and p.num_spec_tokens(r, 2, 100) == 4
    for _ in range(20):
        p.record(r.req_id, 4, 0)  # far below min_acceptance
    assert [p.num_spec_tokens(r, 1, 100) for _ in range(8)] == [1] * 8
    assert sorted(set(p.num_spec_tokens(r, 2, 100) for _ in range(16))) == [0, 1]
    assert SpecDecodeConfig().solo_depth_floor is None  # a draft model keeps its one floor


def test_depth_respects_the_budget_max_tokens_opt_out_and_batch_size():
    p = policy()
    assert p.num_spec_tokens(request(), 1, 3) <= 3
    # one output token so far, max_tokens 4: a step may emit 3 more, so at most 2 drafts
    assert p.num_spec_tokens(request("short", max_tokens=4), 1, 100) == 2
    assert p.num_spec_tokens(request("off", speculative=False), 1, 100) == 0
    assert p.num_spec_tokens(request("busy"), 9, 100) == 0
    assert policy(k=0).num_spec_tokens(request(), 1, 100) == 0


def test_one_request_alone_drafts_up_to_its_own_limit():
    """The limit alone applies while one request runs; with two, the batch limit is back."""
    p = SpecPolicy(SpecDecodeConfig(num_speculative_tokens=8, depth_floor=0.05,
                                    solo_depth_floor=0.01, solo_num_speculative_tokens=16))
    r = request()
    for _ in range(10):
        p.record(r.req_id, 8, 8)  # every draft accepted: a near 1
    assert p.num_spec_tokens(r, 1, 100) == 16 and p.num_spec_tokens(r, 2, 100) == 8
    assert p.num_spec_tokens(r, 1, 10) == 10  # the step's token budget still bounds it
    p.record(r.req_id, 16, 16)  # a 16-deep draft's positions are all counted
    assert p.stats.accepted_per_pos[15] == 1 and len(p.stats.accepted_per_pos) == 16
    with pytest.raises(ValueError, match="solo_num_speculative_tokens"):
        SpecDecodeConfig(num_speculative_tokens=0, solo_num_speculative_tokens=4)


def test_prompt_lookup_defaults_follow_what_a_verified_row_costs():
    ngram = EngineConfig(speculative_method="ngram")
    fp32, quantized = ngram.settle_for_weights(False), ngram.settle_for_weights(True)
    assert (fp32.num_speculative_tokens, fp32.prompt_lookup_min,
            fp32.resolved_num_speculative_tokens_alone) == DEFAULT_NGRAM[False] == (8, 1, 16)
    assert (quantized.num_speculative_tokens, quantized.prompt_lookup_min,
            quantized.resolved_num_speculative_tokens_alone) == (4, 2, 4)
    chosen = EngineConfig(speculative_method="ngram", num_speculative_tokens=3,
                          prompt_lookup_min=3).settle_for_weights(False)
    assert (chosen.num_speculative_tokens, chosen.prompt_lookup_min) == (3, 3)
    assert chosen.resolved_num_speculative_tokens_alone == 3  # a chosen depth holds alone too
    alone = EngineConfig(speculative_method="ngram", num_speculative_tokens_alone=5)
    assert alone.settle_for_weights(False).resolved_num_speculative_tokens_alone == 5
    hybrid = EngineConfig(speculative_method="hybrid").settle_for_weights(False)
    assert hybrid.resolved_num_speculative_tokens_alone == hybrid.num_speculative_tokens == 8
    with pytest.raises(ValueError, match="num_speculative_tokens_alone"):
        EngineConfig(num_speculative_tokens_alone=4)  # speculation off
    with pytest.raises(ValueError, match="num_speculative_tokens_alone"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens_alone=17)
    assert EngineConfig(speculative_method="ngram", prompt_lookup_max=1).settle_for_weights(
        True).prompt_lookup_min == 1
    draft = EngineConfig(speculative_method="draft").settle_for_weights(False)
    assert draft.num_speculative_tokens is None and draft.resolved_num_speculative_tokens == 4
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(speculative_method="ngram", prompt_lookup_min=6)
