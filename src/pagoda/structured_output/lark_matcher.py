"""llguidance's matcher behind xgrammar's matcher interface, for Lark grammars.

The manager drives every matcher through the same four calls; llguidance's token bitmask has
xgrammar's layout (int32 words, bit i of word i // 32 for token i), so the same kernel applies it.
"""

from __future__ import annotations

from typing import Any

import torch


class LarkMatcher:
    def __init__(self, matcher: Any):
        self.matcher = matcher  # llguidance.LLMatcher

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        # try_consume_tokens consumes only a valid prefix: a forbidden token (a draft the grammar
        # rejects) leaves the matcher as it was, as xgrammar's accept_token does, where
        # consume_token would put it into an error state
        return self.matcher.try_consume_tokens([token_id]) == 1

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())
