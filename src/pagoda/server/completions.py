"""`POST /v1/completions`: OpenAI's legacy text completions over the engine.

A thin translation: request schema -> (prompts, SamplingParams) -> engine deltas -> response
schema, streamed as SSE (`data: {chunk}` ... `data: [DONE]`) or returned whole. Several prompts
run as one engine request each (`prompt_batch.py`). `echo` prepends each prompt's text, and with
`logprobs` the prompt tokens' log-probs too (the first is null): what lm-evaluation-harness
reads to score continuations. `max_tokens: 0` with `echo` scores the prompt only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pagoda.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from pagoda.server.engine_client import EngineClient
from pagoda.server.logprobs import completion_logprobs, vllm_prompt_logprobs
from pagoda.server.prompt_batch import admit_all, merged
from pagoda.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from pagoda.server.request_params import completion_params, completion_prompts
from pagoda.server.streaming import (
    EngineStreamingResponse,
    StreamUsage,
    cancel_on_disconnect,
    sse_body,
)


@dataclasses.dataclass
class Echo:
    """What `echo` prepends to one prompt's choices, and whether the generated token is dropped
    (max_tokens 0: the engine generates one token, which nobody asked for)."""

    text: str
    token_ids: list[int]
    score_only: bool


async def create_completion(client: EngineClient, request: CompletionRequest,
                            raw: Request) -> CompletionResponse | Response:
    llm = client.require_generator()
    client.check_model(request.model)
    params = completion_params(request)
    prompts = completion_prompts(request)
    prompt_ids = [await client.prepare(p, params) for p in prompts]
    echoes = [Echo(p if isinstance(p, str) else llm.tokenizer.decode(ids, False), ids,
                   request.max_tokens == 0) if request.echo else None
              for p, ids in zip(prompts, prompt_ids, strict=True)]
    req_id = f"cmpl-{uuid.uuid4().hex}"
    tickets = admit_all(client, len(prompts))
    streams = [client.generate(ids, params, ticket, f"{req_id}-{i}" if len(prompts) > 1
                               else req_id)
               for i, (ids, ticket) in enumerate(zip(prompt_ids, tickets.tickets, strict=True))]
    header = CompletionResponse(id=req_id, created=int(time.time()), model=client.model_name,
                                system_fingerprint=client.system_fingerprint, choices=[])
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
    if request.stream:
        body = _stream(client, request, header, num_prompt_tokens, merged(streams, params.n),
                       echoes)
        return EngineStreamingResponse(body, tickets)  # type: ignore[arg-type]
    try:
        done = await cancel_on_disconnect(
            raw, asyncio.gather(*(client.complete(s) for s in streams)))
    finally:
        tickets.release()
    choices, num_generated, cached = [], 0, 0
    for i, result in enumerate(done):
        for sample in result.samples:
            choices.append(_whole_choice(client, request, i * params.n, sample,
                                         result.output, echoes[i]))
            num_generated += 0 if request.max_tokens == 0 else sample.num_generated_tokens
        cached += result.output.metrics.num_cached_tokens if result.output.metrics else 0
    return header.model_copy(update={
        "choices": choices, "usage": UsageInfo.of(num_prompt_tokens, num_generated, cached)})


def _whole_choice(client: EngineClient, request: CompletionRequest, base: int,
                  sample: CompletionOutput, output: RequestOutput, echo: Echo | None
                  ) -> CompletionChoice:
    token_str = client.require_llm().tokenizer.token_str
    token_ids, entries = list(sample.token_ids), list(sample.logprobs or [])
    text = sample.text
    if echo is not None and echo.score_only:
        token_ids, entries, text = [], [], ""
    if echo is not None:
        text = echo.text + text
    logprobs = None
    if request.logprobs is not None and sample.logprobs is not None:
        if echo is not None:
            token_ids = echo.token_ids + token_ids
            entries = list(output.prompt_logprobs or []) + entries
        logprobs = completion_logprobs(token_ids, entries, request.logprobs, token_str, 0)
    prompt_lps = None
    if request.prompt_logprobs is not None and output.prompt_logprobs is not None:
        prompt_lps = vllm_prompt_logprobs(output.prompt_logprobs, token_str)
    return CompletionChoice(index=base + sample.index, text=text, logprobs=logprobs,
                            finish_reason=sample.finish_reason, prompt_logprobs=prompt_lps)


def _stream(client: EngineClient, request: CompletionRequest, header: CompletionResponse,
            num_prompt_tokens: int, outputs: AsyncIterator[tuple[int, RequestOutput]],
            echoes: list[Echo | None]) -> AsyncIterator[str]:
    token_str = client.require_llm().tokenizer.token_str
    offsets: dict[int, int] = {}  # choice index -> text offset of its next logprobs token
    prompts: dict[int, list[TokenLogprobs | None] | None] = {}  # choice -> prompt log-probs

    async def choice_outputs() -> AsyncIterator[RequestOutput]:
        async for _, out in outputs:
            for o in out.outputs:
                if o.index not in offsets:  # this choice's first delta: echo goes first
                    offsets[o.index] = 0
                    prompts[o.index] = out.prompt_logprobs
                if request.max_tokens == 0:  # scoring: the one token run is not generated
                    o.num_generated_tokens = 0
            yield out

    return sse_body(choice_outputs(), header,
                    lambda delta: _choice(request, delta, token_str, offsets, prompts, echoes),
                    num_prompt_tokens, StreamUsage.of(request.stream_options))


def _choice(request: CompletionRequest, delta: CompletionOutput, token_str,
            offsets: dict[int, int], prompts: dict, echoes: list[Echo | None]
            ) -> CompletionChoice | None:
    token_ids, entries, text = delta.token_ids, delta.logprobs or [], delta.text
    first = delta.index in prompts
    prompt_lps = prompts.pop(delta.index, None)
    echo = echoes[delta.index // request.n]
    if echo is not None and echo.score_only:
        token_ids, entries, text = [], [], ""
    if echo is not None and first:
        text = echo.text + text
        token_ids = echo.token_ids + token_ids
        entries = list(prompt_lps or []) + list(entries)
    logprobs: CompletionLogprobs | None = None
    if request.logprobs is not None and token_ids:
        logprobs = completion_logprobs(token_ids, entries, request.logprobs, token_str,
                                       offsets.get(delta.index, 0))
        offsets[delta.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
    vllm_prompt = None
    if first and request.prompt_logprobs is not None and prompt_lps is not None:
        vllm_prompt = vllm_prompt_logprobs(prompt_lps, token_str)
    if not text and delta.finish_reason is None and logprobs is None:
        return None  # e.g. a token holding half of a UTF-8 character: nothing to show yet
    return CompletionChoice(index=delta.index, text=text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, prompt_logprobs=vllm_prompt)
