"""OpenAI chat-completions wire schemas (requests, responses and stream chunks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pagoda.sampling.params import MAX_LOGPROBS
from pagoda.server.protocol import ChatMessage, SamplingFields, Schema, UsageInfo


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True


class TopLogprob(Schema):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(Schema):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Schema):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(Schema):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(Schema):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Schema):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
