"""Anthropic Messages API wire schemas (`/v1/messages`, `/v1/messages/count_tokens`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from pagoda.server.protocol import (
    HistorySchema,
    RequestSchema,
    Schema,
    text_parts_only,
    type_tagged,
)


class TextBlock(HistorySchema):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # a caching hint; prefix caching is automatic
    citations: list[Any] | None = None  # an earlier answer's sources, echoed back


class ToolUseBlock(HistorySchema):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(HistorySchema):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: object) -> object:
        return text_parts_only(content, ("text",))

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else \
            "\n".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


Block = type_tagged({"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock},
                    "block")


class AnthropicMessage(RequestSchema):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _text_and_tools_only(cls, content: object) -> object:
        return text_parts_only(content, ("text", "tool_use", "tool_result"))


class AnthropicTool(RequestSchema):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class AnthropicToolChoice(RequestSchema):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_with_tool_only(self) -> AnthropicToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice names a tool exactly when its type is 'tool'")
        return self


class ThinkingOff(Schema):
    model_config = ConfigDict(extra="forbid")

    type: Literal["disabled"]


class CountTokensRequest(RequestSchema):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    # {"type": "disabled"} (Anthropic's "off", which some clients always send) or absent;
    # extended thinking ("enabled", "adaptive") is refused, naming the field
    thinking: ThinkingOff | None = None

    @field_validator("thinking", mode="before")
    @classmethod
    def _thinking_off(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "disabled":
            raise ValueError("extended thinking is not supported: thinking.type must be "
                             "'disabled' (or leave thinking out)")
        return value


class MessagesRequest(CountTokensRequest):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)  # Anthropic's range
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False
    metadata: dict[str, Any] | None = None  # user_id etc.: cannot change the output
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here


class TokenCount(Schema):
    input_tokens: int


class Usage(Schema):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0  # prompt tokens served from the prefix cache


class MessagesResponse(Schema):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage
