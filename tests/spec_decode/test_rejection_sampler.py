"""The rejection sampler keeps the target distribution exactly, whatever the draft.

On a 6-token vocabulary: many independent verifications of one drafted token, each draft drawn
from q; the first emitted token must follow the target's p (chi-square, significance 0.001), and
the bonus token after an accepted draft must follow the next row's p. Drafts that are good, always
wrong (a point mass on the least likely token), uniform, or prompt-lookup point masses all pass.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from pagoda.sampling.params import SamplingParams
from pagoda.sampling.sampler import Sampler
from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.proposer import Draft
from pagoda.spec_decode.rejection_sampler import RejectionSampler

ROW0 = torch.tensor([2.0, 1.2, 0.9, 0.1, -0.4, -2.0])
ROW1 = torch.tensor([-1.0, 0.3, 1.5, 0.2, 0.8, 0.0])
N = 4000
ALPHA = 0.001


def sreq(params: SamplingParams, outputs=()):
    return ScheduledRequest("r", [1], 0, [0], True, params, 0, [1], list(outputs))


def target_probs(params: SamplingParams, row: torch.Tensor) -> torch.Tensor:
    p = Sampler.filtered_probs(row.unsqueeze(0), [sreq(params)])[0]
    return p / p.sum()


def assert_follows(tokens: list[int], p: torch.Tensor) -> None:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(p)).double()
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    expected = p[support].double() / p[support].double().sum() * counts.sum()
    result = chisquare(counts[support].numpy(), expected.numpy())
    assert result.pvalue > ALPHA, (counts.tolist(), expected.tolist())


_RUNS: dict[tuple[int, int, int | None], list[list[int]]] = {}


def run(params: SamplingParams, q: torch.Tensor | None, point: int | None = None
        ) -> list[list[int]]:
    """N verifications of one draft token (drawn from q, or the fixed `point`). Seeded, so the
    same arguments (module constants) give the same tokens: each run is done once."""
    key = (id(params), id(q), point)
    if key not in _RUNS:
        _RUNS[key] = _run(params, q, point)
    return _RUNS[key]


def _run(params: SamplingParams, q: torch.Tensor | None, point: int | None
         ) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    rs = RejectionSampler(Sampler(seed=11))
    req = sreq(params)  # the N verifications are independent: one request record serves all
    if q is None:
        items = [(req, Draft([point])) for _ in range(N)]
    else:  # N independent draws from q
        probs = q.unsqueeze(0)
        drafts = torch.multinomial(q, N, replacement=True, generator=g).tolist()
        items = [(req, Draft([d], probs)) for d in drafts]
    logits = torch.stack([ROW0, ROW1]).repeat(N, 1)
    return [tokens for tokens, _ in rs(logits, items, ())]


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.85),
          SamplingParams(temperature=1.3, top_k=4)]
DRAFTS = {
    "close": torch.softmax(ROW0 * 0.8, dim=-1),
    "uniform": torch.full((6,), 1 / 6),
    "always-wrong": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
}


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7-top_p", "t1.3-top_k"])
@pytest.mark.parametrize("draft", list(DRAFTS), ids=list(DRAFTS))
def test_draft_model_keeps_target_distribution(params, draft):
    out = run(params, DRAFTS[draft])
    assert_follows([t[0] for t in out], target_probs(params, ROW0))
    bonus = [t[1] for t in out if len(t) == 2]
    if draft == "always-wrong" and target_probs(params, ROW0)[5] == 0:
        assert not bonus  # a token the target excludes is never accepted
    elif len(bonus) > 100:
        assert_follows(bonus, target_probs(params, ROW1))
    else:
        assert draft == "always-wrong", "a reasonable draft should often be accepted"


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7-top_p", "t1.3-top_k"])
@pytest.mark.parametrize("point", [0, 3, 5])
def test_point_mass_draft_keeps_target_distribution(params, point):
    """Prompt lookup proposes fixed tokens (q a point mass): likely, middling and excluded."""
    out = run(params, None, point)
    assert_follows([t[0] for t in out], target_probs(params, ROW0))


def test_acceptance_rate_is_sum_of_min_p_q():
    """With a draft q, a token is accepted with probability sum_x min(p(x), q(x))."""
    params = PARAMS[0]  # temperature 1: the run of test_draft_model_keeps_target_distribution
    q = DRAFTS["close"]
    out = run(params, q)
    accepted = sum(len(t) == 2 for t in out) / N
    expected = torch.minimum(target_probs(params, ROW0), q).sum().item()
    assert abs(accepted - expected) < 4 * (expected * (1 - expected) / N) ** 0.5


def test_greedy_accepts_while_argmax_agrees():
    params = SamplingParams(temperature=0.0)
    rs = RejectionSampler(Sampler(seed=0))
    logits = torch.stack([ROW0, ROW1, ROW0])
    assert rs(logits, [(sreq(params), Draft([0, 2]))], ())[0][0] == [0, 2, 0]  # bonus
    assert rs(logits, [(sreq(params), Draft([0, 4]))], ())[0][0] == [0, 2]  # corrected
    assert rs(logits[:2], [(sreq(params), Draft([1]))], ())[0][0] == [0]


@pytest.mark.parametrize("draft", [None, *DRAFTS], ids=["point", *DRAFTS])
def test_seeded_verification_emits_the_plain_seeded_draws(draft):
    """A seeded request's verified tokens are the tokens plain seeded sampling draws at those
    positions, whatever the draft (so the first follows p: chi-square over many seeds)."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in range(N)]
    g = torch.Generator().manual_seed(3)
    q = DRAFTS.get(draft) if draft else None
    sampler = Sampler(seed=0)
    rs, firsts = RejectionSampler(sampler), []
    for i, p in enumerate(params[:N if draft is None else 400]):
        d = int(torch.multinomial(q, 1, generator=g)) if q is not None else i % 3
        item = (sreq(p), Draft([d], None if q is None else q.unsqueeze(0)))
        tokens = rs(torch.stack([ROW0, ROW1]), [item], ())[0][0]
        plain = [sampler(ROW0.unsqueeze(0), [sreq(p)], ())[0][0],
                 sampler(ROW1.unsqueeze(0), [sreq(p, outputs=[d])], ())[0][0]]
        assert tokens == plain[:len(tokens)] and (len(tokens) == 2) == (plain[0] == d)
        firsts.append(tokens[0])
    if draft is None:
        assert_follows(firsts, target_probs(params[0], ROW0))


def test_seeded_verification_is_reproducible():
    params = SamplingParams(temperature=1.0, seed=42)
    item = (sreq(params, outputs=[3, 4]), Draft([1, 2], torch.full((2, 6), 1 / 6)))
    logits = torch.stack([ROW0, ROW1, ROW0])
    runs = {tuple(RejectionSampler(Sampler(seed=s))(logits, [item], ())[0][0])
            for s in range(5)}
    assert len(runs) == 1


def test_penalties_see_accepted_drafts():
    """Row j is penalized with drafts 1..j counted as output (as plain decoding would)."""
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    rs = RejectionSampler(Sampler(seed=0))
    flat = torch.tensor([1.0, 0.9, 0.0, 0.0, 0.0, 0.0])
    # without penalties row 1 would pick token 0 again; with token 0 drafted it must pick 1
    assert rs(flat.repeat(2, 1), [(sreq(params), Draft([0]))], ())[0][0] == [0, 1]


def test_logprobs_per_emitted_token():
    params = SamplingParams(temperature=0.0, logprobs=2)
    rs = RejectionSampler(Sampler(seed=0))
    logits = torch.stack([ROW0, ROW1])
    tokens, logprobs = rs(logits, [(sreq(params), Draft([0]))], ())[0]
    assert tokens == [0, 2]
    ref = torch.log_softmax(logits, dim=-1)
    assert logprobs[0][0] == pytest.approx(ref[0, 0].item())
    assert logprobs[1][2] == pytest.approx(ref[1, 2].item())
    assert all(len(lp) == 2 for lp in logprobs)
