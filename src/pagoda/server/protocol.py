"""OpenAI wire schemas shared by every endpoint, and the completions endpoint's own.

These models are the HTTP contract (they generate /openapi.json); translating them into engine
`SamplingParams` happens in `request_params.py`, never here. Request bodies keep the fields they
do not declare (`extra="allow"`) so that `field_policy.py` can refuse the known ones Pagoda does
not implement (400 naming the field) and log the truly unknown ones: nothing is ignored silently.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pagoda.sampling.params import MAX_LOGPROBS
from pagoda.server.field_policy import log_unknown

MAX_SEED = (1 << 63) - 1  # any int64, negative ones included (OpenAI's range, as vLLM's)
MAX_STOP_CHARS = 1000  # per stop string: each is searched for in every new piece of text
MAX_STOP_STRINGS = 16


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestSchema(Schema):
    """A request body (or part of one): strict types, so `"stream": "yes"` or `"max_tokens":
    true` is a 400 rather than a guess (pydantic's lax mode would read them as true and 1), and
    a key no model declares is a 400 naming it, never dropped (the top-level bodies and chat
    messages allow extra keys for field_policy.py, which refuses or names them)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """An explicit null for a field that has a default means that default, as in OpenAI's
        API (nullable fields) and vLLM (`Optional[...] = None`): clients such as LangChain and
        LiteLLM send `"temperature": null` for "unset". A required field stays required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        nulls = [k for k, v in data.items()
                 if v is None and k in fields and not fields[k].is_required()
                 and not _accepts_none(fields[k].annotation)]  # where null means something
        return {k: v for k, v in data.items() if k not in nulls} if nulls else data


def _accepts_none(annotation: Any) -> bool:
    """Whether a field's type takes None itself (`max_tokens: int | None`: null is "no limit")."""
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    if get_origin(annotation) is Annotated:
        return _accepts_none(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return any(_accepts_none(a) for a in get_args(annotation))
    return False


StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]


class ErrorInfo(Schema):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(Schema):
    error: ErrorInfo


class StreamOptions(RequestSchema):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with the whole request's usage
    continuous_usage_stats: bool = False  # vLLM: every chunk carries the usage so far


class JsonSchemaFormat(RequestSchema):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestSchema):
    """OpenAI's `response_format`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(RequestSchema):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's knobs: Pagoda's JSON never has free whitespace, never falls back to another
    # backend, and `disable_additional_properties` is its strict mode; the two below are refused.
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class SamplingFields(RequestSchema):
    """Request fields common to completions and chat completions (OpenAI's plus vLLM's extras)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    # The ranges SamplingParams enforces, declared here too so /openapi.json shows them.
    n: int = Field(default=1, ge=1, le=128)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    speculative: bool = True  # false: no draft tokens for this request (same output, no speedup)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None  # vLLM
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None  # vLLM
    # vLLM's older spellings of structured_outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # "xgrammar" (or "auto"); others are refused

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None,
                             info: ValidationInfo) -> StreamOptions | None:
        """As OpenAI and vLLM: options of a stream on a request that does not stream would
        change nothing, so they are refused rather than ignored."""
        if options is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")
        return options


class CompletionRequest(SamplingFields):
    # A string, a list of one string, token ids, or a list of one list of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 only with echo: score the prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # vLLM


class PromptTokensDetails(Schema):
    cached_tokens: int = 0


class UsageInfo(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, num_prompt_tokens: int, num_generated_tokens: int,
           num_cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=num_prompt_tokens, completion_tokens=num_generated_tokens,
                   total_tokens=num_prompt_tokens + num_generated_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens))


class CompletionLogprobs(Schema):
    """OpenAI's legacy shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(Schema):
    """vLLM's entry for one prompt token alternative."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class CompletionChoice(Schema):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM: per prompt token {token id: entry}, null for the first (only if asked for)
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagoda"
    max_model_len: int


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def type_tagged(members: dict[str, type], suffix: str, default: str | None = None) -> Any:
    """A union of `members` (`type` value -> model) that picks each value's model by its `type`
    (`default` when it has none), so a validation error names a field of that model rather than
    every member's failure. Tags end in `-suffix`: not identifiers, so error locations
    (errors.py) leave them out."""
    def tag(value: Any) -> str:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(
            value, "type", default)
        return f"{kind}-{suffix}"

    tagged = tuple(Annotated[model, Tag(f"{kind}-{suffix}")] for kind, model in members.items())
    return Annotated[Union[tagged], Discriminator(tag)]  # noqa: UP007 (a union of a tuple)


def text_parts_only(content: object, readable: tuple[str, ...]) -> object:
    """A content list whose parts are all of the `readable` types, unchanged; else ValueError
    naming the first other type (an image, audio, a file): a text-only model refuses it by name
    rather than as a failed union of str and list."""
    for part in content if isinstance(content, list) else ():
        kind = part.get("type", readable[0]) if isinstance(part, dict) else readable[0]
        if kind not in readable:
            raise ValueError(f"content parts of type {kind!r} are not supported: this model "
                             f"reads text only (parts of type {', '.join(map(repr, readable))})")
    return content


class HistorySchema(RequestSchema):
    """A piece of a conversation's history (a content part, a tool call, an earlier turn's
    block or item), which clients build from earlier responses and send back with keys of their
    own: LangChain's block ids, OpenAI's logprobs on output text, providers' extra keys on tool
    calls. Unknown keys are accepted and logged once by name, as on chat messages
    (field_policy.py), rather than failing a conversation; a request's own settings (tools,
    formats, tool_choice, options) refuse unknown keys."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_keys(self) -> HistorySchema:
        for name in self.model_extra or ():
            log_unknown(f"{type(self).__name__}.{name}")
        return self


class ContentPart(HistorySchema):
    type: Literal["text"] = "text"
    text: str
    cache_control: dict[str, Any] | None = None  # a caching hint; prefix caching is automatic


class FunctionCall(HistorySchema):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(HistorySchema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    # a streamed delta's position, echoed back in a history: no meaning here, and not in a
    # reply (OpenAI's whole message has no index)
    index: int | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatMessage(RequestSchema):
    model_config = ConfigDict(extra="allow")  # field_policy.py refuses or logs the rest

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this result answers
    refusal: str | None = None  # echoed back by clients from earlier assistant turns

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        return text_parts_only(content, ("text",))

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # one part per line, as vLLM joins them: "part1part2" would glue two words together
        return "\n".join(part.text for part in self.content)


class HealthResponse(Schema):
    status: Literal["ok", "loading", "failed", "draining"]
    detail: str | None = None


class KVCacheInfo(Schema):
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    usage: float
    num_running: int
    num_waiting: int
    num_pending: int  # admitted by the server, no output yet (what --max-waiting bounds)

