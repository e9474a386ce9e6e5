"""The checks a request passes before it is queued: prompt form, context length, KV capacity.

Plain values only, so the engine process can hand a copy to the server process, which then
refuses bad requests (400) without a round trip; the engine runs the same checks on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.sampling.params import SamplingParams


class RequestError(ValueError):
    """A request the engine refuses before queueing it (too long, empty...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestValidator:
    max_model_len: int
    vocab_size: int
    # of the full-attention KV group (group 0): a request holds at most
    # ceil(tokens / block_size) of its blocks, so more than num_blocks can never be scheduled
    block_size: int
    num_blocks: int
    eos_token_ids: tuple[int, ...] = ()  # what min_tokens keeps from being sampled early

    def __post_init__(self) -> None:
        assert self.max_model_len > 0 and self.block_size > 0 and self.num_blocks > 0

    def encode_prompt(self, tokenizer: Any, prompt: str | list[int]
                      ) -> tuple[str | None, list[int]]:
        """Text -> (text, ids) through `tokenizer`; ids -> (None, ids) once range-checked."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", "prompt")
            try:
                return prompt, tokenizer.encode(prompt)
            except ValueError as exc:  # e.g. a lone surrogate
                raise RequestError(str(exc), "prompt") from None
        ids = list(prompt)
        if not ids:
            raise RequestError("prompt must not be empty", "prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        return None, ids

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        for param, ids in params.token_ids_referenced:
            if any(t >= self.vocab_size for t in ids):
                raise RequestError(f"{param} names a token id outside the vocabulary "
                                   f"[0, {self.vocab_size})", param)
        if params.min_tokens and params.allowed_token_ids:
            stops = set(params.stop_token_ids) | set(() if params.ignore_eos
                                                     else self.eos_token_ids)
            if set(params.allowed_token_ids) <= stops:  # nothing would be left to sample
                raise RequestError("allowed_token_ids holds only stop tokens, which min_tokens "
                                   "forbids before its count", "allowed_token_ids")
        if params.structured_outputs is not None:
            from pagoda.structured_output.grammar import ConstraintError, build_grammar

            try:
                build_grammar(params.structured_outputs)
            except ConstraintError as exc:
                raise RequestError(str(exc), "structured_outputs") from None
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt must not be empty", "prompt")
        if params.min_tokens and n + params.min_tokens > self.max_model_len:
            # with max_tokens unset the context is the only bound, and min_tokens must fit it
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"has {n} prompt tokens and asks for at least {params.min_tokens} more",
                "min_tokens")
        want = params.max_tokens or 1
        if n + want > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"has {n} prompt tokens and asks for {want} more", "max_tokens")
        blocks = self.blocks_needed(n + want)
        if blocks > self.num_blocks:
            raise RequestError(f"the request needs {blocks} KV blocks but the cache has only "
                               f"{self.num_blocks}", "max_tokens")
