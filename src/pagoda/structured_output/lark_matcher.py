"""llguidance's matcher behind xgrammar's matcher interface, for Lark grammars.

The manager drives every matcher through the same four calls; llguidance's token bitmask has
xgrammar's layout (int32 words, bit i of word i // 32 for token i), so the same kernel applies it.
"""

from __future__ import annotations

from typing import Any

import torch


class LarkMatcher:
    """xgrammar's semantics for the stop token: llguidance stops as soon as the grammar is
    complete and does not consume the stop token itself; here the stop token is accepted once,
    the matcher is then terminated, and a rollback can undo it (speculative drafts)."""

    def __init__(self, matcher: Any, stop_token_ids: tuple[int, ...]):
        self.matcher = matcher  # llguidance.LLMatcher
        self.stop_token_ids = stop_token_ids
        self._ended = False  # the stop token was accepted

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id in self.stop_token_ids and self.matcher.is_accepting():
            self._ended = True
            return True
        # try_consume_tokens consumes only a valid prefix: a forbidden token (a draft the grammar
        # rejects) leaves the matcher as it was, as xgrammar's accept_token does, where
        # consume_token would put it into an error state
        return self.matcher.try_consume_tokens([token_id]) == 1

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and self._ended:
            self._ended, num_tokens = False, num_tokens - 1
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._ended
