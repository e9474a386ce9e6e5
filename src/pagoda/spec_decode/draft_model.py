"""Draft tokens from a second, cheaper model that runs over its own paged KV cache.

The draft keeps, per request, the tokens whose K/V it holds. Each step it first catches up with
the request (the tokens it has not seen: the whole prompt the first time, then the one or two
tokens the target's verification added), which yields the first draft, then decodes one token
per pass for the rest. Tokens are append-only, so what the draft holds stays valid up to the
first position where its guesses and the verified tokens part; it resumes from there.

Its blocks come from its own pool, carved from the same memory budget as the target's
(`setup.split_budget`). When that pool is short, the state of requests that are not speculating
this step is evicted (it is rebuilt by a catch-up pass if they speculate again); if it is still
short, a request gets no drafts this step: the draft never preempts the target.
"""

from __future__ import annotations

import dataclasses

import torch

from pagoda.kv_cache.hybrid_manager import HybridKVCacheManager
from pagoda.kv_cache.kv_cache_manager import KVCacheManager
from pagoda.sampling.sampler import first_max_index
from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.proposer import Draft
from pagoda.worker.model_runner import ModelRunner


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, kv: KVCacheManager | HybridKVCacheManager):
        self.runner = runner
        self.kv = kv
        self.sampler = runner.sampler
        self.held: dict[str, list[int]] = {}  # req_id -> tokens whose K/V the draft holds
        self.num_evicted = 0  # request states evicted for lack of blocks

    def propose(self, requests: list[ScheduledRequest]) -> dict[str, Draft]:
        passes: list[ScheduledRequest] = []
        for r in requests:
            context = r.context_token_ids
            start = min(_common_prefix(self.held.get(r.req_id, []), context), len(context) - 1)
            # room for the catch-up and the positions of drafts 1..k-1 (draft k is not fed back)
            need = len(context) + r.num_spec_tokens - 1
            if not self.kv.allocate(r.req_id, need):
                self._evict(keep={q.req_id for q in requests})
                if not self.kv.allocate(r.req_id, need):
                    continue
            self.kv.commit_computed(r.req_id, context, start)  # sliding windows drop dead blocks
            self.held[r.req_id] = context[:start]
            passes.append(dataclasses.replace(
                r, token_ids=context[start:], num_computed_tokens=start,
                block_ids=self.kv.block_ids(r.req_id), sample=True))
        tokens: dict[str, list[int]] = {r.req_id: [] for r in passes}
        probs: dict[str, list[torch.Tensor]] = {r.req_id: [] for r in passes}
        while passes:
            sampling, logits = self.runner.forward(passes)
            drawn = self._draw(logits.float().cpu(), sampling, tokens)
            following = []
            for r, (token, q) in zip(sampling, drawn, strict=True):
                rid = r.req_id
                self.held[rid] += r.token_ids
                tokens[rid].append(token)
                if q is not None:
                    probs[rid].append(q)
                if len(tokens[rid]) < r.num_spec_tokens:
                    following.append(dataclasses.replace(
                        r, token_ids=[token],
                        num_computed_tokens=r.num_computed_tokens + len(r.token_ids)))
            passes = following
        return {rid: Draft(t, torch.stack(probs[rid]) if probs[rid] else None)
                for rid, t in tokens.items()}

    def _draw(self, logits: torch.Tensor, requests: list[ScheduledRequest],
              drafted: dict[str, list[int]]) -> list[tuple[int, torch.Tensor | None]]:
        """A token per row: argmax for greedy requests (a point mass), else drawn from q, the
        draft's distribution under the request's temperature / top-k / top-p / min-p (any q
        keeps verification exact; a q close to the target's is accepted more often). The draw
        uses the noise the target's own draw at that position uses: a seeded request's is keyed
        by its position, so the two draws are coupled and agree most of the time, which is what
        its verification asks (rejection_sampler.py)."""
        out: list[tuple[int, torch.Tensor | None]] = [
            (t, None) for t in first_max_index(logits).tolist()]
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if rows:
            # each row's view of its request at this draft's position keys its seeded draw
            views = [dataclasses.replace(requests[i], output_token_ids=(
                requests[i].output_token_ids + drafted[requests[i].req_id])) for i in rows]
            q = self.sampler.filtered_probs(logits[rows], views)
            q = q / q.sum(dim=-1, keepdim=True)
            for j, t in enumerate(self.sampler.race(q, views).tolist()):
                out[rows[j]] = (t, q[j])
        return out

    def _evict(self, keep: set[str]) -> None:
        """Free the draft state of every request not in `keep`."""
        victims = [rid for rid in self.held if rid not in keep]
        self.num_evicted += len(victims)
        self.release(victims)

    def release(self, req_ids: list[str]) -> None:
        for rid in req_ids:
            self.held.pop(rid, None)
            self.kv.free(rid)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    # tokens are append-only, so a and b can differ only in their last few positions
    while n and a[:n] != b[:n]:
        n -= 1
    return n
