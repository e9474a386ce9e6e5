"""OpenAI Responses API wire schemas (`POST /v1/responses`), the stateless subset Pagoda serves.

Fields that would need server-side state or features Pagoda lacks are declared so that a
non-neutral value is a 400 naming them (`responses.py`); undeclared fields are refused by
pydantic (`extra="forbid"`), never dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from pagoda.server.protocol import HistorySchema, RequestSchema, text_parts_only, type_tagged


class InputText(HistorySchema):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # echoed back from earlier outputs
    logprobs: list[Any] | None = None  # likewise


class MessageItem(HistorySchema):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: object) -> object:
        return text_parts_only(content, ("input_text", "output_text", "text"))

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "\n".join(part.text for part in self.content)  # as chat's parts (protocol.py)


class FunctionCallItem(HistorySchema):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(HistorySchema):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


# an item without a `type` is a message, as OpenAI reads it
InputItem = type_tagged({"message": MessageItem, "function_call": FunctionCallItem,
                         "function_call_output": FunctionCallOutputItem}, "item", "message")


class FunctionTool(RequestSchema):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(RequestSchema):
    type: Literal["function"]
    name: str


class TextFormat(RequestSchema):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(RequestSchema):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # only "medium" (responses.py)


class ResponsesRequest(RequestSchema):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # echoed back
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # prefix caching is automatic
    ignore_eos: bool = False  # vLLM's extra, as on chat and completions (guidellm sends it)
    # stateful or unsupported: refused unless neutral (responses.py)
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    reasoning: Any = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
