"""POST /tokenize and /detokenize (vLLM's routes): what a remote tokenizer needs, e.g.
lm-evaluation-harness counting a prompt or a chat client trimming history to fit the context.

A chat-shaped /tokenize renders exactly what /v1/chat/completions would feed the model for the
same `messages`, `tools`, `add_generation_prompt`, `continue_final_message` and
`chat_template_kwargs`, so its `count` is that request's `usage.prompt_tokens`. Every field is
declared: anything else (vLLM's `chat_template`, `mm_processor_kwargs`, ...) is a 400 naming it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict

from pagoda.server.chat import render_chat_off_loop
from pagoda.server.chat_protocol import Tool
from pagoda.server.engine_client import EngineClient, off_loop_if_long
from pagoda.server.errors import APIError
from pagoda.server.field_policy import check_fields
from pagoda.server.protocol import ChatMessage, RequestSchema, Schema
from pagoda.server.tool_prompt import choose_tools


class TokenizeRequest(RequestSchema):
    """Either `prompt` (text) or `messages` (rendered with the chat template)."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # vLLM's defaults: true for a prompt (BOS where the tokenizer adds one); a chat template
    # writes its own special tokens, so with messages only false is accepted
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(Schema):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None  # with return_token_strs: each token's text


class DetokenizeRequest(RequestSchema):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(Schema):
    prompt: str


_CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs")


async def tokenize(client: EngineClient, body: TokenizeRequest) -> TokenizeResponse:
    llm = client.require_llm()
    client.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
    if body.messages is not None:
        if body.add_special_tokens:
            raise APIError(400, "add_special_tokens must be false with messages: the chat "
                                "template writes the special tokens", "add_special_tokens")
        check_fields(body)  # the message fields chat refuses (audio...), as chat does
        ids = await render_chat_off_loop(llm, body.messages, body.add_generation_prompt,
                          choose_tools(body.tools, None, None), body.chat_template_kwargs,
                          body.continue_final_message)
    else:
        # a chat-only field set with a prompt would change nothing: refused rather than ignored
        for name in _CHAT_ONLY:
            value = getattr(body, name)
            if value not in (TokenizeRequest.model_fields[name].default, None, [], {}):
                raise APIError(400, f"{name} applies to messages, not to a prompt", name)
        prompt = body.prompt or ""
        try:
            ids = await off_loop_if_long(len(prompt), llm.tokenizer.encode, prompt,
                                         add_special_tokens=body.add_special_tokens is not False)
        except ValueError as exc:  # a lone surrogate
            raise APIError(400, str(exc), "prompt") from None
    strs = [llm.tokenizer.token_str(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=client.max_model_len,
                            token_strs=strs)


def detokenize(client: EngineClient, body: DetokenizeRequest) -> DetokenizeResponse:
    llm = client.require_llm()
    client.check_model(body.model)
    vocab = llm.model_config.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=llm.tokenizer.decode(body.tokens))
