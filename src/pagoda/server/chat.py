"""`POST /v1/chat/completions`: messages rendered with the model's chat template, then generated.

The template's text already holds the special tokens, so it is encoded with
`add_special_tokens=False`; the rest mirrors completions (SSE chunks or one response).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.server.chat_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
)
from pagoda.server.engine_client import EngineClient
from pagoda.server.errors import APIError
from pagoda.server.logprobs import chat_logprobs
from pagoda.server.protocol import ChatMessage, UsageInfo
from pagoda.server.request_params import chat_messages, chat_params
from pagoda.server.streaming import EngineStreamingResponse, cancel_on_disconnect, sse_body


def render_chat(llm: AsyncLLM, messages: list[ChatMessage],
                add_generation_prompt: bool = True) -> list[int]:
    """Chat messages -> prompt token ids through the model's chat template."""
    try:
        text = llm.tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt)
    except APIError:
        raise
    except Exception as exc:  # template errors (bad role order...) are the caller's fault
        raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
    return llm.tokenizer.encode(text, add_special_tokens=False)


async def create_chat_completion(client: EngineClient, request: ChatCompletionRequest,
                                 raw: Request) -> ChatCompletionResponse | Response:
    llm = client.require_llm()
    client.check_model(request.model)
    params = chat_params(request)
    prompt_ids = await client.prepare(
        render_chat(llm, request.messages, request.add_generation_prompt), params)
    req_id = f"chatcmpl-{uuid.uuid4().hex}"
    ticket = client.admit()
    outputs = client.generate(prompt_ids, params, ticket, req_id)
    chunk = ChatCompletionChunk(id=req_id, created=int(time.time()), model=client.model_name,
                                system_fingerprint=client.system_fingerprint, choices=[])
    if request.stream:
        body = _stream(client, request, chunk, params.n, len(prompt_ids), outputs)
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
                                     llm.tokenizer.token_str)
        choices.append(ChatChoice(index=sample.index,
                                  message=ChatResponseMessage(content=sample.text),
                                  logprobs=logprobs, finish_reason=sample.finish_reason))
    cached = done.output.metrics.num_cached_tokens if done.output.metrics else 0
    return ChatCompletionResponse(
        id=req_id, created=chunk.created, model=chunk.model,
        system_fingerprint=chunk.system_fingerprint, choices=choices,
        usage=UsageInfo.of(len(prompt_ids), done.num_generated_tokens, cached))


def _stream(client: EngineClient, request: ChatCompletionRequest, chunk: ChatCompletionChunk,
            n: int, num_prompt_tokens: int, outputs: AsyncIterator[RequestOutput]
            ) -> AsyncIterator[str]:
    token_str = client.require_llm().tokenizer.token_str
    num_top = request.top_logprobs or 0

    def choice_of(delta: CompletionOutput) -> ChatStreamChoice | None:
        logprobs = None
        if request.logprobs and delta.logprobs:
            logprobs = chat_logprobs(delta.token_ids, delta.logprobs, num_top, token_str)
        if not delta.text and delta.finish_reason is None and logprobs is None:
            return None
        return ChatStreamChoice(index=delta.index, delta=ChatDelta(content=delta.text),
                                logprobs=logprobs, finish_reason=delta.finish_reason)

    roles = [ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
             for i in range(n)]
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return sse_body(outputs, chunk, choice_of, num_prompt_tokens, include_usage,
                    opening=chunk.model_copy(update={"choices": roles}))
