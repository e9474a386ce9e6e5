"""OpenAI's embeddings request and response, with vLLM's `truncate_prompt_tokens`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from pagoda.server.protocol import RequestSchema, Schema

MAX_INPUTS = 2048  # per request, as OpenAI's API


class EmbeddingRequest(RequestSchema):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    model: str | None = None
    # a text, texts, one token-id list or token-id lists
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # refused: no served model is Matryoshka-trained
    user: str | None = None
    # vLLM's: cut each input to this many tokens (-1: the model's limit) instead of refusing it;
    # texts keep their start and the tokenizer's closing special tokens
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)

    @field_validator("input", mode="wrap")
    @classmethod
    def _one_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One plain message instead of pydantic's per-union-member complaints."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("input_type", "input must be a string, a list of strings, "
                                      "a list of token ids or a list of token-id lists") from None


class EmbeddingData(Schema):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Schema):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
