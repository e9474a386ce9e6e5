"""`POST /v1/chat/completions`: messages rendered with the model's chat template, then generated.

The template's text already holds the special tokens, so it is encoded with
`add_special_tokens=False`; the rest mirrors completions (SSE chunks or one response).
"""

from __future__ import annotations

import functools
import inspect
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.loader.tokenizer import TextError, check_unicode
from pagoda.sampling.params import SamplingParams
from pagoda.server.chat_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
)
from pagoda.server.engine_client import EngineClient, off_loop_if_long
from pagoda.server.errors import APIError
from pagoda.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from pagoda.server.protocol import ChatMessage, UsageInfo
from pagoda.server.request_params import chat_messages, chat_params
from pagoda.server.streaming import (
    EngineStreamingResponse,
    StreamUsage,
    cancel_on_disconnect,
    sse_body,
)
from pagoda.server.tool_parser import ToolCallStream, parse_tool_calls
from pagoda.server.tool_prompt import ToolUse, template_messages, tool_use


def render_chat(llm: AsyncLLM, messages: list[ChatMessage], add_generation_prompt: bool = True,
                tools: ToolUse | None = None, template_kwargs: dict[str, Any] | None = None,
                continue_final: bool = False) -> list[int]:
    """Chat messages (and tools) -> prompt token ids through the model's chat template.
    `continue_final` (vLLM's continue_final_message) leaves the last message, the assistant's,
    open: the output continues it rather than starting a new turn."""
    if continue_final:
        if add_generation_prompt:
            raise APIError(400, "continue_final_message continues the last message; it needs "
                                "add_generation_prompt false", "continue_final_message")
        if not messages or messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs the last message to be the "
                                "assistant's", "continue_final_message")
    tools = tools or ToolUse("none", ())
    tokenizer = llm.tokenizer
    check_template_kwargs(tokenizer.hf, template_kwargs)
    _check_unicode(messages)
    knows_tools = "tools" in (getattr(tokenizer.hf, "chat_template", None) or "")
    rendered, extra = template_messages(chat_messages(messages), tools, knows_tools)
    kwargs = {**(template_kwargs or {}), **extra}
    if continue_final:
        kwargs["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt, **kwargs)
    except APIError:
        raise
    except Exception as exc:  # template errors (bad role order...) are the caller's fault
        raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
    try:
        return tokenizer.encode(text, add_special_tokens=False)
    except ValueError as exc:  # a lone surrogate in some message
        raise APIError(400, str(exc), "messages") from None


def _check_unicode(messages: list[ChatMessage]) -> None:
    """A lone surrogate (valid in JSON's escapes, not in UTF-8) named where the client wrote it;
    the tokenizer would refuse it later at a position of the rendered prompt."""
    for i, message in enumerate(messages):
        parts = message.content if isinstance(message.content, list) else [message.content]
        for text in parts:
            text = getattr(text, "text", text)
            if isinstance(text, str):
                try:
                    check_unicode(text)
                except TextError as exc:
                    raise APIError(400, f"messages[{i}].content: {exc}",
                                   f"messages.{i}.content") from None


def check_template_kwargs(hf_tokenizer: Any, template_kwargs: dict[str, Any] | None) -> None:
    """chat_template_kwargs are variables of the model's template (vLLM's field); the names
    apply_chat_template takes as its own arguments (chat_template, tokenize, tools,
    add_generation_prompt...) would change how the request is rendered, bypassing the fields
    that say so (and chat_template would run a client's Jinja on the server): refused."""
    reserved = sorted(set(template_kwargs or ()) & _rendering_arguments(type(hf_tokenizer)))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {reserved[0]!r}: it is an "
                       "argument of the rendering, not a variable of the template (use the "
                       "request's own fields)", "chat_template_kwargs")


@functools.cache
def _rendering_arguments(tokenizer_class: type) -> frozenset[str]:
    signature = inspect.signature(tokenizer_class.apply_chat_template)
    return frozenset({"conversation", "messages", "chat_template", "tools", "documents"} | {
        name for name, p in signature.parameters.items() if p.kind not in (
            inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)} - {"self"})


async def render_chat_off_loop(llm: AsyncLLM, messages: list[ChatMessage],
                               add_generation_prompt: bool = True, tools: ToolUse | None = None,
                               template_kwargs: dict[str, Any] | None = None,
                               continue_final: bool = False) -> list[int]:
    """render_chat, in a worker thread when the messages (and tools) are long: rendering and
    tokenizing megabytes of text takes seconds, which on the event loop would stall every
    client."""
    size = sum(len(str(m.content or "")) + sum(len(c.function.arguments)
                                               for c in m.tool_calls or ()) for m in messages)
    size += sum(len(str(t.function.parameters or "")) for t in (tools.tools if tools else ()))
    return await off_loop_if_long(size, render_chat, llm, messages, add_generation_prompt, tools,
                                  template_kwargs, continue_final)


@dataclass(frozen=True)
class PreparedChat:
    tools: ToolUse
    params: SamplingParams
    prompt_ids: list[int]


async def prepare_chat(client: EngineClient, request: ChatCompletionRequest,
                       model: str | None) -> PreparedChat:
    """The preamble every chat-shaped surface shares (chat, Responses, Messages): the model
    check, tools, sampling parameters and the rendered, validated prompt."""
    llm = client.require_generator()
    client.check_model(model)
    tools = tool_use(request)
    params = chat_params(request, tools)
    prompt_ids = await client.prepare(await render_chat_off_loop(
        llm, request.messages, request.add_generation_prompt, tools,
        request.chat_template_kwargs, request.continue_final_message), params)
    return PreparedChat(tools, params, prompt_ids)


async def create_chat_completion(client: EngineClient, request: ChatCompletionRequest,
                                 raw: Request) -> ChatCompletionResponse | Response:
    if request.stream and request.prompt_logprobs is not None:
        # as vLLM: the chunks have no place for them (completions streams carry them first)
        raise APIError(400, "prompt_logprobs is not available with stream=true on chat "
                            "completions", "prompt_logprobs")
    llm = client.require_generator()
    prepared = await prepare_chat(client, request, request.model)
    tools, params, prompt_ids = prepared.tools, prepared.params, prepared.prompt_ids
    req_id = f"chatcmpl-{uuid.uuid4().hex}"
    ticket = client.admit()
    outputs = client.generate(prompt_ids, params, ticket, req_id)
    chunk = ChatCompletionChunk(id=req_id, created=int(time.time()), model=client.model_name,
                                system_fingerprint=client.system_fingerprint, choices=[])
    if request.stream:
        body = _stream(client, request, tools, chunk, params.n, len(prompt_ids), outputs)
        return EngineStreamingResponse(body, ticket)
    try:
        done = await cancel_on_disconnect(raw, client.complete(outputs))
    finally:
        ticket.release()
    num_top = request.top_logprobs or 0
    choices = []
    for sample in done.samples:
        logprobs = None
        if request.logprobs and sample.logprobs is not None:
            logprobs = chat_logprobs(sample.token_ids, sample.logprobs, num_top,
                                     llm.tokenizer.token_str, llm.tokenizer.token_bytes)
        content, calls = parse_tool_calls(sample.text, tools, sample.finish_reason == "length")
        finish = sample.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        choices.append(ChatChoice(index=sample.index, message=ChatResponseMessage(
            content=content if calls or tools.forced else sample.text, tool_calls=calls or None),
            logprobs=logprobs, finish_reason=finish))
    cached = done.output.metrics.num_cached_tokens if done.output.metrics else 0
    prompt_lps = None
    if request.prompt_logprobs is not None and done.output.prompt_logprobs is not None:
        prompt_lps = vllm_prompt_logprobs(done.output.prompt_logprobs, llm.tokenizer.token_str)
    return ChatCompletionResponse(
        id=req_id, created=chunk.created, model=chunk.model,
        system_fingerprint=chunk.system_fingerprint, choices=choices,
        usage=UsageInfo.of(len(prompt_ids), done.num_generated_tokens, cached),
        prompt_logprobs=prompt_lps)


def _stream(client: EngineClient, request: ChatCompletionRequest, tools: ToolUse,
            chunk: ChatCompletionChunk, n: int, num_prompt_tokens: int,
            outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    tokenizer = client.require_llm().tokenizer
    num_top = request.top_logprobs or 0
    streams = [ToolCallStream(tools) for _ in range(n)]  # one per choice

    def choice_of(delta: CompletionOutput) -> ChatStreamChoice | None:
        logprobs = None
        if request.logprobs and delta.logprobs:
            logprobs = chat_logprobs(delta.token_ids, delta.logprobs, num_top,
                                     tokenizer.token_str, tokenizer.token_bytes)
        stream = streams[delta.index]
        text, calls = stream.feed(delta.text)
        finish = delta.finish_reason
        if finish is not None:
            more_text, more_calls = stream.finish(finish == "length")
            text, calls = text + more_text, calls + more_calls
            if stream.made_calls and finish == "stop":
                finish = "tool_calls"
        if not text and not calls and finish is None and logprobs is None:
            return None
        return ChatStreamChoice(index=delta.index, delta=ChatDelta(
            content=text or None, tool_calls=calls or None),
            logprobs=logprobs, finish_reason=finish)

    # a reply that can only be tool calls opens with null content, as OpenAI's does
    opening = None if tools.mode in ("required", "named") else ""
    roles = [ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=opening))
             for i in range(n)]
    return sse_body(outputs, chunk, choice_of, num_prompt_tokens,
                    StreamUsage.of(request.stream_options),
                    opening=chunk.model_copy(update={"choices": roles}))
