"""Sampler: exclusion guarantees of top-k/top-p/min-p, seeded reproducibility, and frequencies
that match the softmax distribution (chi-square test on a small vocabulary)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from pagoda.sampling.params import SamplingParams, SamplingParamsError
from pagoda.sampling.sampler import Sampler, first_max_index
from pagoda.scheduler.output import ScheduledRequest

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def sreq(params: SamplingParams, outputs=(), index=0, prompt=(1,)):
    return ScheduledRequest("r", [1], 0, [0], True, params, index, list(prompt), list(outputs))


def draw(params: SamplingParams, n: int, logits=LOGITS, sampler=None) -> torch.Tensor:
    sampler = sampler or Sampler(seed=1234)
    reqs = [sreq(params) for _ in range(n)]
    ids, _ = sampler(logits.repeat(n, 1), reqs, eos_token_ids=())
    return torch.tensor(ids)


def test_greedy_is_argmax():
    assert draw(SamplingParams(temperature=0), 4).tolist() == [0, 0, 0, 0]


def test_first_max_index_is_argmax_with_ties_infinities_and_nan():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        x = torch.randint(-3, 3, (6, 500), generator=g).float()  # many ties
        x[0] = float("-inf")  # a row that allows nothing
        x[1, 7 + trial % 50] = float("nan")
        x[2, :250] = float("-inf")
        x[3, 499] = float("inf")
        assert torch.equal(first_max_index(x), x.argmax(dim=-1)), trial


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_frequencies_match_softmax(temperature):
    n = 20000
    ids = draw(SamplingParams(temperature=temperature), n)
    expected = torch.softmax(LOGITS / temperature, dim=0) * n
    observed = torch.bincount(ids, minlength=len(LOGITS)).double()
    keep = expected > 5  # chi-square needs reasonable expected counts
    obs, exp = observed[keep], expected[keep].double()
    exp = exp * obs.sum() / exp.sum()
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_top_k_never_emits_excluded():
    ids = draw(SamplingParams(temperature=2.0, top_k=3), 5000)
    assert set(ids.tolist()) == {0, 1, 2}


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS, dim=0)
    cum = probs.cumsum(0)
    p = float(cum[2]) - 1e-4  # needs tokens 0, 1, 2 exactly
    ids = draw(SamplingParams(temperature=1.0, top_p=p), 5000)
    assert set(ids.tolist()) == {0, 1, 2}


def test_min_p_threshold():
    probs = torch.softmax(LOGITS, dim=0)
    min_p = float(probs[3] / probs[0]) + 1e-4  # token 3 falls just below the threshold
    ids = draw(SamplingParams(temperature=1.0, min_p=min_p), 5000)
    assert set(ids.tolist()) == {0, 1, 2}


def test_top_k_frequencies_are_renormalized():
    n = 20000
    ids = draw(SamplingParams(temperature=1.0, top_k=2), n)
    p = torch.softmax(LOGITS[:2], dim=0)
    assert set(ids.tolist()) <= {0, 1}
    observed = torch.bincount(ids, minlength=2)[:2].double()
    expected = p.double() * observed.sum() / p.double().sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_seed_is_reproducible_and_batch_independent():
    params = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(seed=1)(LOGITS.unsqueeze(0), [sreq(params, outputs=[5, 6])], ())[0]
    crowd_reqs = [sreq(SamplingParams(temperature=1.0)) for _ in range(7)]
    crowd_reqs.insert(3, sreq(params, outputs=[5, 6]))
    crowd = Sampler(seed=99)(LOGITS.repeat(8, 1), crowd_reqs, ())[0]
    assert crowd[3] == alone[0]
    # different positions / sample indices give independent draws
    draws = {Sampler()(LOGITS.unsqueeze(0), [sreq(params, outputs=[0] * k)], ())[0][0]
             for k in range(40)}
    assert len(draws) > 2


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[1.0, 0.9, -0.5]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    ids, _ = Sampler()(logits, [sreq(params, prompt=[0])], ())
    assert ids == [1]  # 1.0 / 2 < 0.9


def test_presence_and_frequency_penalties():
    logits = torch.tensor([[1.0, 0.6, 0.0]])
    ids, _ = Sampler()(logits, [sreq(SamplingParams(temperature=0, frequency_penalty=0.3),
                                     outputs=[0, 0])], ())
    assert ids == [1]  # 1.0 - 2 * 0.3 = 0.4 < 0.6
    ids, _ = Sampler()(logits, [sreq(SamplingParams(temperature=0, presence_penalty=0.3),
                                     outputs=[0, 0])], ())
    assert ids == [0]  # presence counts once: 0.7 > 0.6


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    ids, _ = Sampler()(logits, [sreq(params, outputs=[2])], eos_token_ids=(0,))
    assert ids == [2]


def test_logprobs_include_top_n_and_sampled():
    params = SamplingParams(temperature=0, logprobs=2)
    _, lps = Sampler()(LOGITS.unsqueeze(0), [sreq(params)], ())
    ref = torch.log_softmax(LOGITS, 0)
    assert set(lps[0]) == {0, 1}
    assert lps[0][0] == pytest.approx(ref[0].item())


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(max_tokens=0), dict(n=0), dict(logprobs=99),
                                 dict(min_p=2), dict(presence_penalty=3)])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature", [1e-6, 1e-38, 5e-324])
def test_a_temperature_below_the_greedy_threshold_is_argmax(temperature):
    """logits / 1e-38 overflow fp32: such a request samples greedily (as vLLM's below 1e-5)."""
    logits = LOGITS.flip(0)  # the argmax last: NaN rows would read as token 0
    assert draw(SamplingParams(temperature=temperature), 8, logits).tolist() == [7] * 8


def test_a_top_k_beyond_the_vocabulary_keeps_it_all():
    """Any integer top_k is accepted (2**63 once overflowed the tensor and killed the engine);
    beyond the vocabulary it excludes nothing."""
    params = SamplingParams(temperature=3.0, top_k=2**63)
    assert set(draw(params, 4000).tolist()) == set(range(len(LOGITS)))


def test_a_tiny_repetition_penalty_keeps_the_logits_finite():
    """A seen token's logit divided by 1e-300 stops at a finite ceiling: the penalty's favourite
    still wins, at any temperature, and nothing reads NaN."""
    logits = torch.tensor([[-2.0, 3.0, 1.0, 0.5]])
    for temperature in (0, 1e-5, 1.0):
        params = SamplingParams(temperature=temperature, repetition_penalty=1e-300)
        ids, _ = Sampler(seed=0)(logits, [sreq(params, prompt=[2])], ())
        assert ids == [2]


def test_a_row_that_allows_no_token_samples_no_token():
    """allowed_token_ids of stop tokens only, under min_tokens: nothing may be sampled, and the
    row says so (NO_TOKEN) instead of drawing an excluded token; its neighbour samples as ever."""
    from pagoda.sampling.sampler import NO_TOKEN

    logits = torch.stack([LOGITS, LOGITS])
    dead = SamplingParams(temperature=1.0, min_tokens=2, allowed_token_ids=[3])
    ids, _ = Sampler(seed=0)(logits, [sreq(dead), sreq(SamplingParams(temperature=0))],
                             eos_token_ids=(3,))
    assert ids == [NO_TOKEN, 0]
