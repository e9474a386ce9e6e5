"""Prompt lookup where the context repeats itself, a draft model everywhere else.

Each step, a request whose last `min_n` or more tokens occurred earlier in its prompt or output
takes the continuation of that match as its draft (no model runs); every other request asks the
draft model. The two complement each other: a quoted span is drafted whole for free, free text
by a model that agrees with the target most of the time. The draft model catches up with the
tokens a lookup draft added when the request next asks it (one pass over them, as after any
verification), so its state stays valid.

Exactness needs nothing new: which proposer drafts is a function of the context alone, and each
draft carries the distribution it came from (a point mass for lookup), which the rejection rule
uses as it would for that proposer alone.

Measured on the grounded and chat prompts of benchmarks/spec_decode.py (docs/spec_decode.md):
matches of 3+ tokens beat 2 (whose drafts are more often wrong where a model would be right) and
4 (which leave spans to the slower model); the model's drafts are held to DRAFT_DEPTH, since each
of its tokens costs a forward pass while a lookup draft's extra tokens cost only verified rows.
And the model drafts only while at most MODEL_MAX_BATCH requests draft in a step: its passes
grow with the batch where lookup costs nothing, so at 4 concurrent grounded requests lookup alone
was faster (1.51x vs 1.35x over no speculation; at 2: 1.48x vs 1.57x).
"""

from __future__ import annotations

import dataclasses

from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.draft_model import DraftModelProposer
from pagoda.spec_decode.ngram import NgramProposer
from pagoda.spec_decode.proposer import Draft

DRAFT_DEPTH = 4  # most draft-model tokens a step (the draft method's measured default)
LOOKUP_MIN_N = 3  # the shortest match that drafts by lookup (when prompt_lookup_min is unset)
MODEL_MAX_BATCH = 2  # more requests drafting than this: lookup only


class HybridProposer:
    def __init__(self, lookup: NgramProposer, model: DraftModelProposer,
                 draft_depth: int = DRAFT_DEPTH, model_max_batch: int = MODEL_MAX_BATCH):
        self.lookup, self.model, self.draft_depth = lookup, model, draft_depth
        self.model_max_batch = model_max_batch
        self.num_lookup_drafts = 0  # drafts from each source, for benchmarks and tests
        self.num_model_drafts = 0

    def propose(self, requests: list[ScheduledRequest]) -> dict[str, Draft]:
        drafts = self.lookup.propose(requests)
        rest = [dataclasses.replace(r, num_spec_tokens=min(r.num_spec_tokens, self.draft_depth))
                for r in requests if r.req_id not in drafts]
        self.num_lookup_drafts += len(drafts)
        if rest and len(requests) <= self.model_max_batch:
            from_model = self.model.propose(rest)
            self.num_model_drafts += len(from_model)
            drafts.update(from_model)
        return drafts

    def release(self, req_ids: list[str]) -> None:
        self.lookup.release(req_ids)
        self.model.release(req_ids)
