"""Prompt lookup: propose the continuation of the latest earlier occurrence of the request's
last n tokens (n from max_n down to min_n) in its own prompt and output. No model runs.

It pays where the output quotes the input (summaries, edits, answers from a context, code) and
costs nearly nothing when nothing matches: no draft, no extra verified tokens.
"""

from __future__ import annotations

import numpy as np

from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.proposer import Draft

# A match of a single token predicts its continuation poorly: in a replay of the greedy outputs
# of the grounded prompts of benchmarks/spec_decode.py, the first drafted token was right after
# 25% of 1-token matches, 41% of 2-token ones and every 4- and 5-token one; 1-token matches
# accepted 0.72 tokens on average when drafting 8. Their drafts are cut to this many tokens
# (the rows a rejected draft costs are then few; docs/spec_decode.md has the measurement).
SINGLE_TOKEN_MATCH_DEPTH = 2


class NgramProposer:
    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError("ngram sizes need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[ScheduledRequest]) -> dict[str, Draft]:
        drafts = {}
        for r in requests:
            tokens, n = lookup(np.asarray(r.context_token_ids, dtype=np.int64), self.min_n,
                               self.max_n, r.num_spec_tokens)
            if n == 1:
                tokens = tokens[:SINGLE_TOKEN_MATCH_DEPTH]
            if tokens:
                drafts[r.req_id] = Draft(tokens)
        return drafts

    def release(self, req_ids: list[str]) -> None:
        pass


def lookup(context: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[list[int], int]:
    """Up to k tokens that followed the latest earlier match of the longest suffix n-gram, and
    that n (0: no match).

    An earlier match of the last n tokens ends at a position j < len - 1 holding the last token,
    so only those positions are candidates: one comparison over the context finds them, and each
    candidate's match is then extended backwards, one offset for all candidates at a time, up to
    max_n. (Comparing every n-token window for each n from max_n down, as before, took ~0.6 ms a
    step at 300 tokens: 2-3% of a batch-1 fp32 decode step, paid per drafting request.)"""
    length = len(context)
    top = min(max_n, length - 1)  # a match ends before the suffix's last token
    if top < min_n:
        return [], 0
    ends = np.flatnonzero(context[:length - 1] == context[length - 1])
    if not len(ends):
        return [], 0
    matched = np.ones(len(ends), dtype=np.int64)  # tokens each candidate matches, back from j
    going = np.ones(len(ends), dtype=bool)  # still matching at every offset so far
    for offset in range(1, top):
        going &= ends >= offset
        going[going] = context[ends[going] - offset] == context[length - 1 - offset]
        if not going.any():
            break
        matched += going
    for n in range(top, min_n - 1, -1):
        hits = ends[matched >= n]
        if len(hits):
            start = int(hits[-1]) + 1  # the latest match: most often the most relevant one
            return context[start:start + k].tolist(), n
    return [], 0
