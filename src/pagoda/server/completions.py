"""`POST /v1/completions`: OpenAI's legacy text completions over the engine.

A thin translation: request schema -> (prompt, SamplingParams) -> engine deltas -> response
schema, streamed as SSE (`data: {chunk}` ... `data: [DONE]`) or returned whole.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.server.engine_client import EngineClient
from pagoda.server.logprobs import completion_logprobs
from pagoda.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from pagoda.server.request_params import completion_params, completion_prompt
from pagoda.server.streaming import EngineStreamingResponse, cancel_on_disconnect, sse_body


async def create_completion(client: EngineClient, request: CompletionRequest,
                            raw: Request) -> CompletionResponse | Response:
    llm = client.require_llm()
    client.check_model(request.model)
    params = completion_params(request)
    prompt_ids = await client.prepare(completion_prompt(request), params)
    req_id = f"cmpl-{uuid.uuid4().hex}"
    ticket = client.admit()
    outputs = client.generate(prompt_ids, params, ticket, req_id)
    header = CompletionResponse(id=req_id, created=int(time.time()), model=client.model_name,
                                system_fingerprint=client.system_fingerprint, choices=[])
    if request.stream:
        body = _stream(client, request, header, len(prompt_ids), outputs)
        return EngineStreamingResponse(body, ticket)
    try:
        done = await cancel_on_disconnect(raw, client.complete(outputs))
    finally:
        ticket.release()
    choices = []
    for sample in done.samples:
        logprobs = None
        if request.logprobs is not None and sample.logprobs is not None:
            logprobs = completion_logprobs(sample.token_ids, sample.logprobs, request.logprobs,
                                           llm.tokenizer.token_str, 0)
        choices.append(CompletionChoice(index=sample.index, text=sample.text, logprobs=logprobs,
                                        finish_reason=sample.finish_reason))
    cached = done.output.metrics.num_cached_tokens if done.output.metrics else 0
    return header.model_copy(update={
        "choices": choices,
        "usage": UsageInfo.of(len(prompt_ids), done.num_generated_tokens, cached)})


def _stream(client: EngineClient, request: CompletionRequest, header: CompletionResponse,
            num_prompt_tokens: int, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    token_str = client.require_llm().tokenizer.token_str
    offsets: dict[int, int] = {}  # sample index -> text offset of its next logprobs token
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return sse_body(outputs, header, lambda delta: _choice(request, delta, token_str, offsets),
                    num_prompt_tokens, include_usage)


def _choice(request: CompletionRequest, delta: CompletionOutput, token_str,
            offsets: dict[int, int]) -> CompletionChoice | None:
    logprobs: CompletionLogprobs | None = None
    if request.logprobs is not None and delta.logprobs:
        logprobs = completion_logprobs(delta.token_ids, delta.logprobs, request.logprobs,
                                       token_str, offsets.get(delta.index, 0))
        offsets[delta.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
    if not delta.text and delta.finish_reason is None and logprobs is None:
        return None  # e.g. a token holding half of a UTF-8 character: nothing to show yet
    return CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                            finish_reason=delta.finish_reason)
