"""Per-request sampling parameters (the vLLM / OpenAI set), validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pagoda.sampling.constraint import StructuredOutputs


class SamplingParamsError(ValueError):
    """Invalid sampling parameters; `param` names the offending field (OpenAI error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]
# A temperature below this samples greedily (vLLM's threshold too): logits / 1e-38 overflow
# fp32 to inf and the softmax to NaN, and below it the draw is the argmax in all but ties.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per token (the sampled one is always added)
    # log-probabilities of the prompt's tokens (top-N alternatives each, the actual token always
    # added; the first token has none). Such a request bypasses the prefix cache: a cached
    # block's positions are never run through the model.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    speculative: bool = True  # False: this request never gets draft tokens (per-request opt-out)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # vLLM: only these tokens may be sampled
    structured_outputs: StructuredOutputs | None = None  # the output must match this grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1 and self.n <= 128, "n", "n must be between 1 and 128"),
            (0.0 <= self.temperature <= 100.0, "temperature", "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "top_k must be -1, 0 (disabled) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
             "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
             "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "min_tokens must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             "prompt_logprobs", f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}"),
            (len(self.stop) <= 16, "stop", "at most 16 stop strings"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "stop_token_ids must be non-negative"),
            (all(isinstance(t, int) and t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                 for t, b in (self.logit_bias or {}).items()), "logit_bias",
             "logit_bias maps token ids to biases in [-100, 100]"),
            (self.allowed_token_ids is None or (len(self.allowed_token_ids) > 0 and all(
                isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
             "allowed_token_ids", "allowed_token_ids must be a non-empty list of token ids"),
            # A grammar decides when the output may end; a forced minimum or an ignored EOS
            # would contradict it, so the pair is refused rather than resolved silently.
            (self.structured_outputs is None or self.min_tokens == 0, "min_tokens",
             "min_tokens cannot be combined with a structured-output constraint"),
            (self.structured_outputs is None or not self.ignore_eos, "ignore_eos",
             "ignore_eos cannot be combined with a structured-output constraint"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)

    @property
    def token_ids_referenced(self) -> list[tuple[str, list[int]]]:
        """(field, ids) of every field naming token ids, for the vocabulary check."""
        return [("stop_token_ids", self.stop_token_ids),
                ("logit_bias", list(self.logit_bias or ())),
                ("allowed_token_ids", list(self.allowed_token_ids or ()))]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def for_sample(self, index: int) -> SamplingParams:
        """Parameters of the `index`-th of n samples: n=1, and a distinct but reproducible seed."""
        seed = None if self.seed is None else self.seed + index * 1_000_003
        return dataclasses.replace(self, n=1, seed=seed)
