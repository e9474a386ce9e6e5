"""Prompt lookup where the context repeats itself, a draft model everywhere else.

Each step, a request whose last `min_n` or more tokens occurred earlier in its prompt or output
takes the continuation of that match as its draft (no model runs); every other request asks the
draft model. The two complement each other: a quoted span is drafted whole for free, free text
by a model that agrees with the target most of the time. The draft model catches up with the
tokens a lookup draft added when the request next asks it (one pass over them, as after any
verification), so its state stays valid.

Exactness needs nothing new: whichever proposer drafts (which depends on the context, the batch
and the model's record below), each draft carries the distribution it came from (a point mass
for lookup), which the rejection rule uses as it would for that proposer alone; a seeded
request is verified against its own seeded draws, so its tokens do not depend on the choice.

Measured on the grounded and chat prompts of benchmarks/spec_decode.py (docs/spec_decode.md):
matches of 3+ tokens beat 2 (whose drafts are more often wrong where a model would be right) and
4 (which leave spans to the slower model); the model's drafts are held to DRAFT_DEPTH, since each
of its tokens costs a forward pass while a lookup draft's extra tokens cost only verified rows.
And the model drafts only while at most MODEL_MAX_BATCH requests draft in a step: its passes
grow with the batch where lookup costs nothing, so at 4 concurrent grounded requests lookup alone
was faster (1.51x vs 1.35x over no speculation; at 2: 1.48x vs 1.57x).

The scheduler's policy sets depths by a request's acceptance over both kinds of draft, with
prompt lookup's floors (its deep drafts are lookup's). The model's own acceptance is kept here,
from what the context shows at the next step (how many of its last draft were kept), and gates
it as the draft method's policy would: position j while a^j >= MODEL_DEPTH_FLOOR, and a request
whose model drafts are mostly rejected only probes with one every PROBE_EVERY steps (the
policy's), so a poor draft model costs little even for a request running alone.
"""

from __future__ import annotations

import dataclasses

from pagoda.scheduler.output import ScheduledRequest
from pagoda.scheduler.spec_policy import SpecState
from pagoda.spec_decode.draft_model import DraftModelProposer
from pagoda.spec_decode.ngram import NgramProposer
from pagoda.spec_decode.proposer import Draft

DRAFT_DEPTH = 4  # most draft-model tokens a step (the draft method's measured default)
LOOKUP_MIN_N = 3  # the shortest match that drafts by lookup (when prompt_lookup_min is unset)
MODEL_MAX_BATCH = 2  # more requests drafting than this: lookup only
MODEL_DEPTH_FLOOR = 0.2  # the draft method's floor (engine/config.py)
MODEL_MIN_ACCEPTANCE = 0.15  # below it the model only probes (the policy's default)


class HybridProposer:
    def __init__(self, lookup: NgramProposer, model: DraftModelProposer,
                 draft_depth: int = DRAFT_DEPTH, model_max_batch: int = MODEL_MAX_BATCH):
        self.lookup, self.model, self.draft_depth = lookup, model, draft_depth
        self.model_max_batch = model_max_batch
        self.num_lookup_drafts = 0  # drafts from each source, for benchmarks and tests
        self.num_model_drafts = 0
        self.states: dict[str, SpecState] = {}  # req_id -> the model drafts' acceptance
        self.pending: dict[str, tuple[int, list[int]]] = {}  # req_id -> (context length, draft)

    def propose(self, requests: list[ScheduledRequest]) -> dict[str, Draft]:
        for r in requests:
            self._score(r)
        drafts = self.lookup.propose(requests)
        self.num_lookup_drafts += len(drafts)
        if len(requests) > self.model_max_batch:
            return drafts
        rest = []
        for r in requests:
            depth = self._model_depth(r) if r.req_id not in drafts else 0
            if depth:
                rest.append(dataclasses.replace(r, num_spec_tokens=depth))
        if rest:
            from_model = self.model.propose(rest)
            self.num_model_drafts += len(from_model)
            for r in rest:
                if r.req_id in from_model:
                    self.pending[r.req_id] = (len(r.context_token_ids),
                                              from_model[r.req_id].token_ids)
            drafts.update(from_model)
        return drafts

    def _score(self, r: ScheduledRequest) -> None:
        """Count how much of the request's last model draft the context kept."""
        if r.req_id not in self.pending:
            return
        length, draft = self.pending.pop(r.req_id)
        kept = r.context_token_ids[length:length + len(draft)]  # the verified continuation
        accepted = 0
        while accepted < len(kept) and kept[accepted] == draft[accepted]:
            accepted += 1
        self.states.setdefault(r.req_id, SpecState()).record(accepted, len(draft))

    def _model_depth(self, r: ScheduledRequest) -> int:
        limit = min(r.num_spec_tokens, self.draft_depth)
        return min(limit, self.states.setdefault(r.req_id, SpecState()).next_depth(
            limit, MODEL_DEPTH_FLOOR, MODEL_MIN_ACCEPTANCE))

    def release(self, req_ids: list[str]) -> None:
        self.lookup.release(req_ids)
        self.model.release(req_ids)
        for rid in req_ids:
            self.states.pop(rid, None)
            self.pending.pop(rid, None)
