"""OpenAI's Responses API, stateless: `POST /v1/responses`.

Like the Messages API, one translation (`to_chat`) turns the request into the chat-completions
request it means (`instructions` as the system turn, input items as turns, `function_call` /
`function_call_output` items as tool calls and results, `text.format` as `response_format`,
function tools), and the chat route's path does the rest. The reply is drawn as Responses
output items (`message` with `output_text`, `function_call`), streamed as the Responses event
sequence: `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta` ... `.done`,
`response.function_call_arguments.delta` / `.done`, `response.output_item.done`,
`response.completed`, or `response.incomplete` when max_output_tokens cut the reply (as OpenAI
ends such a stream; the response's status and the cut item's are then "incomplete").

Nothing is stored: `store: true`, `previous_response_id`, `conversation` and `background` are
400s naming the field, as are `reasoning`, `include`, `truncation: "auto"`, `top_logprobs`,
`max_tool_calls` and a non-default `service_tier`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.engine.request_validator import RequestError
from pagoda.sampling.params import SamplingParamsError
from pagoda.server.chat import prepare_chat
from pagoda.server.chat_protocol import ChatCompletionRequest
from pagoda.server.engine_client import EngineClient, error_of
from pagoda.server.errors import APIError
from pagoda.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponsesRequest,
)
from pagoda.server.streaming import EngineStreamingResponse, cancel_on_disconnect
from pagoda.server.tool_parser import ToolCallStream, parse_tool_calls
from pagoda.server.tool_prompt import ToolUse, chat_tools, named_choice

REFUSED = {"store": "responses are not stored (stateless server)",
           "previous_response_id": "responses are not stored (stateless server)",
           "conversation": "conversations are not stored (stateless server)",
           "background": "background responses are not supported",
           "reasoning": "this server's models have no reasoning mode",
           "include": "no extra output data is available",
           "top_logprobs": "log-probs are not supported on /v1/responses; use chat completions",
           "max_tool_calls": "is not supported",
           "stream_options": "is not supported"}


def _check_refused(request: ResponsesRequest) -> None:
    for name, reason in REFUSED.items():
        value = getattr(request, name)
        if value not in (None, False, [], {}):
            raise APIError(400, f"{name}: {reason}", name)
    if request.truncation == "auto":
        raise APIError(400, "truncation 'auto' is not supported", "truncation")
    if request.service_tier not in (None, "auto", "default"):
        raise APIError(400, "only the default service tier exists", "service_tier")
    if request.text is not None and request.text.verbosity not in (None, "medium"):
        # nothing steers a small model's length by a word; the default is what it does anyway
        raise APIError(400, "text.verbosity: only 'medium' (the default) is supported",
                       "text.verbosity")


def to_chat(request: ResponsesRequest) -> ChatCompletionRequest:
    _check_refused(request)
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    items = [{"type": "message", "role": "user", "content": request.input}] \
        if isinstance(request.input, str) else [i.model_dump() for i in request.input]
    for item in items:
        if item["type"] == "function_call":
            call = FunctionCallItem.model_validate(item)
            entry = {"id": call.call_id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get(
                    "tool_calls") is not None:
                messages[-1]["tool_calls"].append(entry)  # parallel calls: one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [entry]})
        elif item["type"] == "function_call_output":
            result = FunctionCallOutputItem.model_validate(item)
            messages.append({"role": "tool", "tool_call_id": result.call_id,
                             "content": result.output})
        else:
            messages.append({"role": item["role"],
                             "content": MessageItem.model_validate(item).text()})
    fields: dict[str, Any] = {"messages": messages, "temperature": request.temperature,
                              "top_p": request.top_p, "stream": request.stream,
                              "max_completion_tokens": request.max_output_tokens,
                              "ignore_eos": request.ignore_eos}
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    if request.tools:
        fields["tools"] = chat_tools([(t.name, t.description, t.parameters)
                                      for t in request.tools])
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = choice if isinstance(choice, str) else named_choice(choice.name)
    if request.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise APIError(400, str(exc.errors()[0].get("msg")), "input") from None


# The chat fields a Responses request is translated into, by the fields the client wrote
CHAT_TO_RESPONSES = {"messages": "input", "max_tokens": "max_output_tokens",
                     "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
                     "tool_choice": "tool_choice", "tools": "tools"}


async def create_response(client: EngineClient, request: ResponsesRequest, raw: Request
                          ) -> Response:
    try:
        prepared = await prepare_chat(client, to_chat(request), request.model)
    except (APIError, RequestError, SamplingParamsError) as exc:
        # name the client's own field, not the chat one it became
        error = exc if isinstance(exc, APIError) else APIError.bad_request(exc)
        head = (error.param or "").split(".")[0].split("[")[0]
        if head in CHAT_TO_RESPONSES:
            # a chat message's index is not its input item's (instructions, merged calls):
            # only the field itself is named
            error.param = CHAT_TO_RESPONSES[head]
            error.message = error.message.replace(head, CHAT_TO_RESPONSES[head])
        raise error from None
    tools, params, prompt_ids = prepared.tools, prepared.params, prepared.prompt_ids
    resp_id = f"resp_{uuid.uuid4().hex[:24]}"
    shell = _shell(client, request, resp_id)
    ticket = client.admit()
    outputs = client.generate(prompt_ids, params, ticket, resp_id)
    if request.stream:
        return EngineStreamingResponse(_events(shell, len(prompt_ids), tools, outputs), ticket)
    try:
        done = await cancel_on_disconnect(raw, client.complete(outputs))
    finally:
        ticket.release()
    sample = done.samples[0]
    content, calls = parse_tool_calls(sample.text, tools, sample.finish_reason == "length")
    text = content if calls or tools.forced else sample.text
    items = ([_message_item(text)] if text else []) + [
        _call_item(c.function.name, c.function.arguments, c.id) for c in calls]
    if items and sample.finish_reason == "length":
        # the item max_output_tokens cut: the text, where a reply has any (a call is only taken
        # out of text once complete, except in required / named modes, which write no text)
        items[0 if text else -1]["status"] = "incomplete"
    cached = done.output.metrics.num_cached_tokens if done.output.metrics else 0
    return JSONResponse(_finished(shell, items, sample, len(prompt_ids), cached))


def _shell(client: EngineClient, request: ResponsesRequest, resp_id: str) -> dict[str, Any]:
    """The response object's fields that do not depend on the output."""
    return {"id": resp_id, "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "model": client.model_name, "output": [],
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "tool_choice": request.tool_choice if isinstance(request.tool_choice, str) else (
                request.tool_choice.model_dump() if request.tool_choice else "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in request.tools or []],
            "text": {"format": {"type": "text"}} if request.text is None else
            request.text.model_dump(by_alias=True, exclude_none=True),
            "metadata": request.metadata or {}, "store": False, "truncation": "disabled",
            "error": None, "incomplete_details": None, "usage": None,
            "previous_response_id": None, "reasoning": None, "user": request.user}


def _message_item(text: str, item_id: str | None = None, status: str = "completed"
                  ) -> dict[str, Any]:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex[:24]}", "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(name: str, arguments: str, call_id: str, item_id: str | None = None,
               status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or f"fc_{uuid.uuid4().hex[:24]}",
            "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _finished(shell: dict[str, Any], items: list[dict[str, Any]], sample: CompletionOutput,
              num_prompt_tokens: int, cached: int) -> dict[str, Any]:
    cut = sample.finish_reason == "length"
    return {**shell, "status": "incomplete" if cut else "completed", "output": items,
            "completed_at": None if cut else int(time.time()),  # as OpenAI: when completed
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {"input_tokens": num_prompt_tokens,
                      "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": sample.num_generated_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": num_prompt_tokens + sample.num_generated_tokens}}


async def _events(shell: dict[str, Any], num_prompt_tokens: int, tools: ToolUse,
                  outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    seq = 0
    items: list[dict[str, Any]] = []  # finished output items, in order
    text_item: dict[str, Any] | None = None  # the message item being written
    calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its item being written
    stream = ToolCallStream(tools)
    closing = "completed"  # the status of items closed now: "incomplete" at a length cut

    def event(kind: str, **payload: Any) -> str:
        nonlocal seq
        seq += 1
        body = {"type": kind, "sequence_number": seq - 1, **payload}
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    def close_text() -> list[str]:
        nonlocal text_item
        if text_item is None:
            return []
        item, text_item = text_item, None
        index, text = len(items), item["content"][0]["text"]
        part = {"type": "output_text", "text": text, "annotations": []}
        items.append({**item, "status": closing})
        return [event("response.output_text.done", item_id=item["id"], output_index=index,
                      content_index=0, text=text),
                event("response.content_part.done", item_id=item["id"], output_index=index,
                      content_index=0, part=part),
                event("response.output_item.done", output_index=index, item=items[-1])]

    def pieces(text: str, deltas) -> list[str]:
        nonlocal text_item
        out: list[str] = []
        if text:
            if text_item is None:
                text_item = _message_item("", status="in_progress")
                index = len(items)
                out += [event("response.output_item.added", output_index=index,
                              item={**text_item, "content": []}),
                        event("response.content_part.added", item_id=text_item["id"],
                              output_index=index, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": []})]
            text_item["content"][0]["text"] += text
            out.append(event("response.output_text.delta", item_id=text_item["id"],
                             output_index=len(items), content_index=0, delta=text))
        for d in deltas:
            if d.function.name is not None:  # a new call: close what is open
                out += close_text() + close_call()
                calls[d.index] = _call_item(d.function.name, "", d.id or "",
                                            status="in_progress")
                out.append(event("response.output_item.added", output_index=len(items),
                                 item=calls[d.index]))
            if d.function.arguments:
                calls[d.index]["arguments"] += d.function.arguments
                out.append(event("response.function_call_arguments.delta",
                                 item_id=calls[d.index]["id"], output_index=len(items),
                                 delta=d.function.arguments))
        return out

    def close_call() -> list[str]:
        out = []
        for key in list(calls):
            item = {**calls.pop(key), "status": closing}
            index = len(items)
            items.append(item)
            out += [event("response.function_call_arguments.done", item_id=item["id"],
                          output_index=index, arguments=item["arguments"]),
                    event("response.output_item.done", output_index=index, item=item)]
        return out

    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    final: CompletionOutput | None = None
    cached = 0
    async for out in outputs:
        if out.error:
            err = error_of(out.error)
            yield event("error", code=err.code, message=err.message, param=None)
            return
        cached = out.metrics.num_cached_tokens if out.metrics else cached
        for delta in out.outputs:
            for piece in pieces(*stream.feed(delta.text)):
                yield piece
            if delta.finish_reason is not None:
                final = delta
                flushed = pieces(*stream.finish(delta.finish_reason == "length"))
                ended: list[str] = []
                if delta.finish_reason == "length":
                    # the text still open was cut (calls before it are complete), else the
                    # call being written (required / named modes write no text)
                    ended = close_call() if text_item is not None else []
                    closing = "incomplete"
                for piece in flushed + ended + close_text() + close_call():
                    yield piece
    if final is None:
        return
    # OpenAI's terminal event names the status: a max_output_tokens cut ends with
    # `response.incomplete` (openai-python's get_final_response() raises then, as against OpenAI)
    done = _finished(shell, items, final, num_prompt_tokens, cached)
    yield event(f"response.{done['status']}", response=done)
