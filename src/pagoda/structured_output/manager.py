"""Per-request grammar state: which requests wait for a grammar, the token masks of a step,
and advancing each matcher over the tokens a step accepted.

The grammar state follows the one scheduling invariant: a matcher has consumed exactly the
request's output tokens. It advances only on accepted tokens (after sampling or verification),
so preemption and recompute leave it untouched, and it is dropped when the request ends.
Drafted tokens are consumed tentatively to build the masks of the positions after them, then
rolled back before the verified tokens are accepted.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.structured_output.grammar_compiler import GrammarCompiler

log = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, compiler: GrammarCompiler, vocab_size: int):
        self.compiler = compiler
        self.vocab_size = vocab_size
        self._pending: dict[str, Future] = {}
        self._matchers: dict[str, Any] = {}  # req_id -> xgrammar.GrammarMatcher or LarkMatcher

    # -- lifecycle ---------------------------------------------------------------------------
    def add(self, req_id: str, constraint: StructuredOutputs) -> None:
        self._pending[req_id] = self.compiler.submit(constraint)

    def poll(self, req_id: str) -> tuple[bool, str | None]:
        """(ready?, error): a request may be scheduled once its grammar is compiled."""
        if req_id in self._matchers:
            return True, None
        future = self._pending[req_id]
        if not future.done():
            return False, None
        del self._pending[req_id]
        try:
            new_matcher = future.result()
        except Exception as exc:  # noqa: BLE001 - the front-end validated; a late refusal
            return True, str(exc)
        matcher = new_matcher()
        if not self._admits_a_token(matcher):
            # e.g. `root ::= root` or the regex `[^\s\S]`: valid, but no output matches, and
            # an all-masked row would be sampled as token 0
            return True, "the constraint admits no output at all"
        self._matchers[req_id] = matcher
        return True, None

    def _admits_a_token(self, matcher: Any) -> bool:
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        row = torch.zeros(1, self.vocab_size)
        xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=self.vocab_size)
        return bool(torch.isfinite(row).any())

    def wait(self, timeout: float) -> None:
        """Block until some pending grammar is compiled (the engine has nothing else to do)."""
        if self._pending:
            wait(list(self._pending.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def release(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self._pending.pop(req_id, None)
            self._matchers.pop(req_id, None)

    def has(self, req_id: str) -> bool:
        return req_id in self._matchers

    # -- per step ----------------------------------------------------------------------------
    def apply_masks(self, logits: torch.Tensor, rows: dict[str, range],
                    drafts: dict[str, list[int]]) -> None:
        """Mask (in place) the logits rows of constrained requests: row j of a request scores
        the position after its first j drafted tokens."""
        import xgrammar as xgr

        constrained = [(rid, r) for rid, r in rows.items() if rid in self._matchers]
        if not constrained:
            return
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        indices: list[int] = []
        for req_id, row_range in constrained:
            self._fill(self._matchers[req_id], bitmask, row_range, drafts.get(req_id, []))
            indices += row_range
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                        indices=indices)

    @staticmethod
    def _fill(matcher: Any, bitmask: torch.Tensor, row_range: range, draft: list[int]) -> None:
        accepted = 0
        for j, row in enumerate(row_range):
            matcher.fill_next_token_bitmask(bitmask, row)
            if j < len(draft):
                ok = matcher.accept_token(draft[j])
                accepted += ok
                if not ok or matcher.is_terminated():
                    # Verification rejects this draft (its probability is masked to 0), or it
                    # is the stop token that ends the grammar and the request (a terminated
                    # matcher has no next mask): either way no token is taken from the rows
                    # after it; they keep this row's mask.
                    for later in row_range[j + 1:]:
                        bitmask[later] = bitmask[row]
                    break
        if accepted:
            matcher.rollback(accepted)

    def advance(self, new_tokens: dict[str, list[int]]) -> None:
        """Consume each constrained request's accepted tokens."""
        for req_id, tokens in new_tokens.items():
            matcher = self._matchers.get(req_id)
            if matcher is None:
                continue
            for t in tokens:
                if matcher.is_terminated():
                    break  # the stop token ended the grammar; the scheduler ends the request
                if not matcher.accept_token(t):  # cannot happen under the mask
                    log.error("request %s: token %d is outside its grammar", req_id, t)
                    break
