"""Verification of draft tokens against the target's logits, keeping its distribution exact.

A request with m drafts d_1..d_m has m + 1 target rows: row j (0-based) scores the position
after d_1..d_j. Its distribution p_j is what the plain sampler would use there: the same
penalties, temperature, top-k / top-p / min-p, computed with d_1..d_j as output tokens.

- Greedy: d_{j+1} is accepted while it is argmax p_j; the first mismatch emits argmax p_j
  instead, and when all match the bonus argmax p_m follows. The tokens are exactly the ones
  decoding without speculation produces.
- Sampling (Leviathan et al. / Chen et al., "modified rejection sampling"): d_{j+1}, drawn from
  the draft's q_j, is accepted with probability min(1, p_j(d) / q_j(d)). On the first rejection
  one token is drawn from norm(max(0, p_j - q_j)) and the step ends; if all m are accepted a
  bonus token is drawn from p_m. Each emitted token is then distributed exactly as p. For a
  point-mass draft (prompt lookup) q_j(d) = 1, so the acceptance probability is p_j(d) and the
  residual is p_j with d removed.

- Seeded sampling: row j draws the token plain decoding would draw there (the same noise, keyed
  by seed and position) and d_{j+1} is accepted while it equals that token; the first mismatch
  emits the drawn token, and when all match the bonus draw follows. The output is then exactly
  the non-speculative seeded output, whatever the drafts: the same with speculation on or off,
  with any method or depth, alone or in any batch. A draft model drawing from its q with the
  same noise (draft_model.py) agrees with it most of the time (the exponential race couples the
  two draws: with q = p they always agree); a point-mass draft is accepted with probability
  p_j(d), as under the rejection rule.

Unseeded draws come from `Sampler`'s shared generator.
"""

from __future__ import annotations

import dataclasses

import torch

from pagoda.engine.outputs import TokenLogprobs
from pagoda.sampling.sampler import (
    NO_TOKEN,
    Sampler,
    allows_nothing,
    first_max_index,
    greedy_rows,
    token_logprobs,
)
from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.proposer import Draft

Verified = tuple[list[int], list[TokenLogprobs] | None]  # new tokens, and their logprobs


def position_views(r: ScheduledRequest, draft: Draft) -> list[ScheduledRequest]:
    """One view of the request per target row: the output as it stands before that row."""
    out = r.output_token_ids
    return [dataclasses.replace(r, output_token_ids=out + draft.token_ids[:j])
            for j in range(len(draft.token_ids) + 1)]


class RejectionSampler:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, items: list[tuple[ScheduledRequest, Draft]],
                 eos_token_ids: tuple[int, ...]) -> list[Verified]:
        """logits: (sum of len(draft) + 1, V), each request's rows consecutive, in item order."""
        logits = logits.float()
        assert logits.shape[0] == sum(len(d.token_ids) + 1 for _, d in items)
        raw = None
        if any(r.sampling_params.logprobs is not None for r, _ in items):
            raw = torch.log_softmax(logits, dim=-1)
        # a view per row, only where something reads it: penalties (their earliest row has the
        # fewest outputs, the one min_tokens can touch) or a sampled request's verification
        views = None
        if any(Sampler.touches(r.sampling_params, len(r.output_token_ids)) for r, _ in items):
            views = [v for r, d in items for v in position_views(r, d)]
            logits = self.sampler.apply_penalties(logits, views, eos_token_ids)
        targets = None
        if all(r.sampling_params.greedy for r, _ in items):
            targets, nothing = greedy_rows(logits)
            dead = set(nothing)
        else:
            dead = set(allows_nothing(logits))
        results: list[Verified] = []
        start = 0
        for r, draft in items:
            rows = slice(start, start + len(draft.token_ids) + 1)
            if targets is not None:
                tokens = _verify_greedy(targets[rows], draft.token_ids)
            elif r.sampling_params.greedy:
                tokens = _verify_greedy(first_max_index(logits[rows]).tolist(), draft.token_ids)
            else:
                tokens = self._verify_random(logits[rows], views[rows] if views is not None
                                             else position_views(r, draft), draft)
            # a position that allows no token ends the request there (as plain sampling's)
            cut = next((j for j in range(len(tokens)) if start + j in dead), None)
            if cut is not None:
                tokens = tokens[:cut] + [NO_TOKEN]
            logprobs = None
            if raw is not None and r.sampling_params.logprobs is not None:
                logprobs = [token_logprobs(raw[start + j], r.sampling_params.logprobs, t)
                            for j, t in enumerate(tokens)]
            results.append((tokens, logprobs))
            start = rows.stop
        return results

    def _verify_random(self, logits: torch.Tensor, views: list[ScheduledRequest], draft: Draft
                       ) -> list[int]:
        p = self.sampler.filtered_probs(logits, views)
        if views[0].sampling_params.seed is not None:
            # the tokens plain seeded decoding draws at these positions (the module docstring)
            return _verify_greedy(self.sampler.race(p, views).tolist(), draft.token_ids)
        p = p / p.sum(dim=-1, keepdim=True)  # min-p leaves rows unnormalized
        tokens: list[int] = []
        for j, d in enumerate(draft.token_ids):
            q_d = 1.0 if draft.probs is None else draft.probs[j, d].item()
            # accept with probability min(1, p/q): u * q < p for u ~ U[0, 1)
            if self.sampler.uniform() * q_d < p[j, d].item():
                tokens.append(d)
                continue
            if draft.probs is None:
                residual = p[j].clone()
                residual[d] = 0.0
            else:
                residual = (p[j] - draft.probs[j]).clamp_(min=0.0)
            if not residual.sum() > 0:  # p <= q everywhere cannot reject; rounding can
                residual = p[j]
            tokens.append(int(self.sampler.race(residual.unsqueeze(0), [views[j]])[0]))
            return tokens
        m = len(draft.token_ids)
        tokens.append(int(self.sampler.race(p[m:m + 1], [views[m]])[0]))
        return tokens


def _verify_greedy(targets: list[int], draft_ids: list[int]) -> list[int]:
    """targets[j] = the token row j emits (its argmax, or its seeded draw); accept drafts while
    they agree, then one target token."""
    tokens = []
    for target, d in zip(targets, draft_ids, strict=False):
        tokens.append(target)
        if target != d:
            return tokens
    tokens.append(targets[len(draft_ids)])
    return tokens
