"""Engine log-probabilities ({token_id: logprob} per generated token) in OpenAI's two shapes.

Each engine entry holds the top-N alternatives plus the sampled token (which may fall outside the
top N), so the sampled token's logprob is always present.
"""

from __future__ import annotations

from collections.abc import Callable

from pagoda.engine.outputs import TokenLogprobs
from pagoda.server.chat_protocol import ChatLogprobs, TokenLogprob, TopLogprob
from pagoda.server.protocol import CompletionLogprobs, PromptLogprob

TokenStr = Callable[[int], str]
TokenBytes = Callable[[int], bytes]
FLOOR = -9999.0  # stands in for -inf, which JSON cannot carry


def _top(entry: TokenLogprobs, n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:n]


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None],
                        num_top: int, token_str: TokenStr, text_offset: int
                        ) -> CompletionLogprobs:
    """Legacy shape: parallel lists; `text_offset` counts characters of the token strings
    from the start of the completion, continuing from `text_offset` across stream chunks.
    A None entry (an echoed prompt's first token) has null log-probs, as OpenAI's."""
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = token_str(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.get(token_id))
        # keyed by text, where distinct ids can read the same (byte pieces of one character
        # read as U+FFFD): a text keeps its most likely id's log-prob, as it is listed first
        top: dict[str, float] = {}
        for t, lp in _top(entry, num_top):
            top.setdefault(token_str(t), lp)
        top.setdefault(text, entry.get(token_id, FLOOR))
        out.top_logprobs.append(top)
    return out


def vllm_prompt_logprobs(entries: list[TokenLogprobs | None], token_str: TokenStr
                         ) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token {token id: logprob, decoded token}."""
    return [None if entry is None else {
        str(t): PromptLogprob(logprob=lp, decoded_token=token_str(t)) for t, lp in entry.items()}
        for entry in entries]


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], num_top: int,
                  token_str: TokenStr, token_bytes: TokenBytes) -> ChatLogprobs:
    """OpenAI's chat shape. `bytes` is each token's own bytes (`token_bytes`), not its text's:
    a token holding part of a UTF-8 character reads as U+FFFD, and the bytes of a reply's
    tokens, joined, must be the reply's UTF-8."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        top = [TopLogprob(token=token_str(t), logprob=lp, bytes=list(token_bytes(t)))
               for t, lp in _top(entry, num_top)]
        content.append(TokenLogprob(token=token_str(token_id), logprob=entry.get(token_id, FLOOR),
                                    bytes=list(token_bytes(token_id)), top_logprobs=top))
    return ChatLogprobs(content=content)
