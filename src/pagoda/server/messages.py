"""Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`.

One translation (`to_chat`): an Anthropic request becomes the chat-completions request it
means (system turn, text blocks, `tool_use` blocks as assistant tool calls, `tool_result` blocks
as tool turns, tools and tool_choice), and from there it takes the chat route's path: the same
parameters, chat template, tool prompt and constraint, engine call and tool-call parser. Only
the reply is drawn in Anthropic's shapes: content blocks, `stop_reason`, and the SSE events
`message_start`, `content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`.
Errors on these routes are in Anthropic's shape (`errors.py`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.server.chat import prepare_chat, render_chat_off_loop
from pagoda.server.chat_protocol import ChatCompletionRequest, DeltaToolCall
from pagoda.server.engine_client import EngineClient, error_of
from pagoda.server.errors import APIError
from pagoda.server.messages_protocol import (
    CountTokensRequest,
    MessagesRequest,
    MessagesResponse,
    TextBlock,
    TokenCount,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from pagoda.server.streaming import EngineStreamingResponse, cancel_on_disconnect
from pagoda.server.tool_parser import ToolCallStream, parse_tool_calls
from pagoda.server.tool_prompt import chat_tools, named_choice, tool_use

CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def to_chat(request: CountTokensRequest) -> ChatCompletionRequest:
    """The chat-completions request an Anthropic request means."""
    messages: list[dict[str, Any]] = []
    if request.system:
        system = request.system if isinstance(request.system, str) else \
            "\n".join(b.text for b in request.system)
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(request.messages):
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) \
            else m.content
        # several text blocks reach the model one per line, as the chat route's text parts do
        text = "\n".join(b.text for b in blocks if isinstance(b, TextBlock))
        calls = [b for b in blocks if isinstance(b, ToolUseBlock)]
        results = [b for b in blocks if isinstance(b, ToolResultBlock)]
        if (m.role == "user" and calls) or (m.role == "assistant" and results):
            raise APIError(400, f"messages.{i}: tool_use blocks belong to assistant turns and "
                           "tool_result blocks to user turns", f"messages.{i}.content")
        if m.role == "assistant":
            messages.append({"role": "assistant", "content": text or None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": json.dumps(c.input)}} for c in calls] or None})
            continue
        messages += [{"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text()}
                     for r in results]
        if text or not results:
            messages.append({"role": "user", "content": text})
    fields: dict[str, Any] = {"messages": messages}
    if request.tools:
        fields["tools"] = chat_tools([(t.name, t.description, t.input_schema)
                                      for t in request.tools])
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = named_choice(choice.name or "") \
            if choice.type == "tool" else CHOICES[choice.type]
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and last.get("content") and not last.get("tool_calls"):
        # Anthropic's prefill: a final assistant turn is continued, not closed and answered
        fields.update(add_generation_prompt=False, continue_final_message=True)
    if isinstance(request, MessagesRequest):
        fields.update(max_tokens=request.max_tokens, temperature=request.temperature,
                      stop=request.stop_sequences, top_p=request.top_p or 1.0,
                      top_k=request.top_k or -1, stream=request.stream)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(400, f"{first.get('msg')}", "messages") from None


async def count_tokens(client: EngineClient, request: CountTokensRequest) -> TokenCount:
    llm = client.require_generator()
    client.check_model(request.model)
    chat = to_chat(request)
    return TokenCount(input_tokens=len(await render_chat_off_loop(
        llm, chat.messages, chat.add_generation_prompt, tool_use(chat),
        continue_final=chat.continue_final_message)))


async def create_message(client: EngineClient, request: MessagesRequest, raw: Request
                         ) -> MessagesResponse | Response:
    prepared = await prepare_chat(client, to_chat(request), request.model)
    tools, params, prompt_ids = prepared.tools, prepared.params, prepared.prompt_ids
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    ticket = client.admit()
    outputs = client.generate(prompt_ids, params, ticket, msg_id)
    if request.stream:
        return EngineStreamingResponse(_events(client, msg_id, len(prompt_ids), tools, outputs),
                                       ticket)
    try:
        done = await cancel_on_disconnect(raw, client.complete(outputs))
    finally:
        ticket.release()
    sample = done.samples[0]
    content, calls = parse_tool_calls(sample.text, tools, sample.finish_reason == "length")
    blocks: list[dict[str, Any]] = []
    text = content if calls or tools.forced else sample.text
    if text:
        blocks.append({"type": "text", "text": text})
    blocks += [{"type": "tool_use", "id": _tool_id(c.id), "name": c.function.name,
                "input": _input(c.function.arguments)} for c in calls]
    stop_reason, stop_sequence = _stop(sample, bool(calls))
    cached = done.output.metrics.num_cached_tokens if done.output.metrics else 0
    return MessagesResponse(id=msg_id, model=client.model_name, content=blocks,
                            stop_reason=stop_reason, stop_sequence=stop_sequence,
                            usage=Usage(input_tokens=len(prompt_ids),
                                        output_tokens=sample.num_generated_tokens,
                                        cache_read_input_tokens=cached))


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):  # cut by max_tokens: the text as it stands
        return {"_partial_json": arguments}


def _stop(sample: CompletionOutput, called: bool) -> tuple[str | None, str | None]:
    if sample.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(sample.stop_reason, str):
        return "stop_sequence", sample.stop_reason
    return "end_turn", None


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n"


async def _events(client: EngineClient, msg_id: str, num_prompt_tokens: int, tools,
                  outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """Anthropic's event sequence; text and tool calls become consecutive content blocks."""
    stream = ToolCallStream(tools)
    index, open_kind = -1, None  # the content block being written: "text" or "tool_use"
    num_generated, finish = 0, None

    def start(kind: str, block: dict[str, Any]) -> list[str]:
        nonlocal index, open_kind
        events = close()
        index, open_kind = index + 1, kind
        return events + [_event("content_block_start", {"index": index, "content_block": block})]

    def close() -> list[str]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [_event("content_block_stop", {"index": index})]

    def blocks(text: str, calls: list[DeltaToolCall]) -> list[str]:
        events = []
        if text:
            if open_kind != "text":
                events += start("text", {"type": "text", "text": ""})
            events.append(_event("content_block_delta", {
                "index": index, "delta": {"type": "text_delta", "text": text}}))
        for call in calls:
            if call.function.name is not None:
                events += start("tool_use", {"type": "tool_use", "id": _tool_id(call.id or ""),
                                             "name": call.function.name, "input": {}})
            if call.function.arguments:
                events.append(_event("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": call.function.arguments}}))
        return events

    def message_start(cached: int) -> str:
        return _event("message_start", {"message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": client.model_name,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": {
                "input_tokens": num_prompt_tokens, "output_tokens": 0,
                "cache_read_input_tokens": cached}}})

    started = False
    async for out in outputs:
        if out.error:  # before any output: the only event
            yield _event("error", error_of(out.error).anthropic_body())
            return
        if not started:  # with the first output, which knows the prefix-cache hits
            started = True
            yield message_start(out.metrics.num_cached_tokens if out.metrics else 0)
        for delta in out.outputs:
            num_generated = delta.num_generated_tokens
            for piece in blocks(*stream.feed(delta.text)):
                yield piece
            if delta.finish_reason is not None:
                finish = delta
                for piece in blocks(*stream.finish(delta.finish_reason == "length")):
                    yield piece
    if not started:
        yield message_start(0)
    for piece in close():
        yield piece
    stop_reason, stop_sequence = _stop(finish, stream.made_calls) if finish else (None, None)
    yield _event("message_delta", {"delta": {"stop_reason": stop_reason,
                                             "stop_sequence": stop_sequence},
                                   "usage": {"output_tokens": num_generated}})
    yield _event("message_stop", {})
