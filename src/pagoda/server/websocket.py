"""`WS /v1/ws`: several streamed requests multiplexed on one WebSocket (docs/websocket.md).

Client messages: a request (`{"type": "chat" | "completion", "id": ..., <OpenAI fields>}`) or
`{"type": "cancel", "id": ...}`. Server messages: `start`, `delta`, `done`, `error`, each naming
the client's `id`. Every request runs in its own task; cancelling the task (cancel message or
connection closed) closes its engine generator, which aborts the engine request and frees its
blocks at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from pagoda.sampling.params import SamplingParamsError
from pagoda.server.auth import token_matches
from pagoda.server.chat import render_chat_off_loop
from pagoda.server.chat_protocol import ChatCompletionRequest
from pagoda.server.engine_client import EngineClient, error_of
from pagoda.server.errors import APIError, validation_message
from pagoda.server.logprobs import chat_logprobs
from pagoda.server.protocol import CompletionRequest, UsageInfo
from pagoda.server.request_params import (
    chat_params,
    completion_params,
    completion_prompts,
)
from pagoda.server.tool_parser import parse_tool_calls
from pagoda.server.tool_prompt import ToolUse, tool_use

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
MAX_ID_CHARS = 256


class Connection:
    def __init__(self, client: EngineClient, ws: WebSocket):
        self.client = client
        self.ws = ws
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()
        self.replies: set[asyncio.Future[None]] = set()  # sends in flight from _ended
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            if self.ws.client_state == WebSocketState.CONNECTED:
                await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    async def send_error(self, req_id: Any, err: APIError, **extra: Any) -> None:
        await self.send({"type": "error", "id": req_id, **err.body(), **extra})

    async def run(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    try:
                        text = (message.get("bytes") or b"").decode("utf-8")
                    except UnicodeDecodeError:
                        await self.send_error(None, APIError(400, "message is not valid UTF-8"))
                        continue
                await self.dispatch(text)
        except WebSocketDisconnect:
            pass
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def dispatch(self, text: str) -> None:
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):  # a few KB of brackets exhaust the parser's stack
            await self.send_error(None, APIError(400, "message is not valid JSON (or nests "
                                                 "too deeply to read)"))
            return
        if not isinstance(payload, dict):
            await self.send_error(None, APIError(400, "message must be a JSON object"))
            return
        kind = payload.pop("type", "chat")
        req_id = payload.pop("id", None)
        if not isinstance(req_id, (str, int)) or len(str(req_id)) > MAX_ID_CHARS:
            await self.send_error(req_id, APIError(400, "every message needs an 'id' (string or "
                                                   "integer) chosen by the client", "id"))
            return
        if kind == "cancel":
            task = self.tasks.get(_key(req_id))
            if task is not None:  # unknown or finished ids are ignored: cancels race with done
                self.cancelled.add(_key(req_id))
                task.cancel()
            return
        if kind not in ("chat", "completion"):
            await self.send_error(req_id, APIError(400, f"unknown message type {kind!r}", "type"))
            return
        if _key(req_id) in self.tasks:
            await self.send_error(req_id, APIError(400, f"id {req_id!r} is already in use", "id"))
            return
        task = asyncio.create_task(self.serve_request(kind, req_id, payload))
        self.tasks[_key(req_id)] = task
        task.add_done_callback(lambda done: self._ended(req_id, done))

    def _ended(self, req_id: Any, task: asyncio.Task[None]) -> None:
        self.tasks.pop(_key(req_id), None)
        # A cancel message (not a closed connection) gets its `done` here, once the task has
        # ended: also when it was cancelled before serve_request ever ran, which then could
        # not say so itself, and the client is owed one `done` or `error` per request.
        if task.cancelled() and _key(req_id) in self.cancelled:
            self.cancelled.discard(_key(req_id))
            reply = asyncio.ensure_future(self.send({"type": "done", "id": req_id,
                                                     "cancelled": True}))
            self.replies.add(reply)
            reply.add_done_callback(self.replies.discard)

    async def serve_request(self, kind: str, req_id: Any, payload: dict[str, Any]) -> None:
        try:
            await self._generate(kind, req_id, payload)
        except APIError as err:
            extra = {"retry_after": self.client.config.retry_after} if err.status == 503 else {}
            await self.send_error(req_id, err, **extra)
        except ValidationError as exc:  # named as over HTTP (no union-branch tags)
            await self.send_error(req_id, APIError(400, *validation_message(exc.errors())))
        except (SamplingParamsError, ValueError) as exc:
            await self.send_error(req_id, APIError.bad_request(exc))
        except Exception:
            log.exception("websocket request %r failed", req_id)
            await self.send_error(req_id, APIError(500, "internal error"))

    async def _generate(self, kind: str, req_id: Any, payload: dict[str, Any]) -> None:
        client = self.client
        llm = client.require_generator()
        payload = {**payload, "stream": True}  # replies always stream (a `stream` is ignored)
        request = (ChatCompletionRequest if kind == "chat" else CompletionRequest
                   ).model_validate(payload)
        if request.stream_options is not None and request.stream_options.continuous_usage_stats:
            raise APIError(400, "continuous_usage_stats is not offered here: the done message "
                                "carries the usage", "stream_options.continuous_usage_stats")
        if request.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not offered on the WebSocket (use the HTTP "
                                "routes)", "prompt_logprobs")
        client.check_model(request.model)
        if isinstance(request, ChatCompletionRequest):
            tools = tool_use(request)
            params = chat_params(request, tools)
            prompt: str | list[int] = await render_chat_off_loop(
                llm, request.messages, request.add_generation_prompt, tools,
                request.chat_template_kwargs, request.continue_final_message)
            num_top = (request.top_logprobs or 0) if request.logprobs else None
        else:
            params = completion_params(request)
            prompts = completion_prompts(request)
            if len(prompts) > 1 or request.echo:
                raise APIError(400, "one prompt per WebSocket message, without echo",
                               "echo" if request.echo else "prompt")
            prompt = prompts[0]
            num_top = request.logprobs  # the deltas carry them as chat messages' do
            tools = ToolUse("none", ())
        prompt_ids = await client.prepare(prompt, params)
        engine_id = f"ws-{uuid.uuid4().hex}"
        ticket = client.admit()
        await self.send({"type": "start", "id": req_id, "request_id": engine_id,
                         "model": client.model_name, "created": int(time.time()),
                         "prompt_tokens": len(prompt_ids)})
        generated: dict[int, int] = {}
        finish: dict[int, str | None] = {}
        texts: dict[int, str] = {}
        final = None
        try:
            async with contextlib.aclosing(client.generate(prompt_ids, params, ticket,
                                                           engine_id)) as outputs:
                async for out in outputs:
                    if out.error:
                        raise error_of(out.error)
                    for d in out.outputs:
                        generated[d.index] = d.num_generated_tokens
                        texts[d.index] = texts.get(d.index, "") + d.text
                        finish[d.index] = d.finish_reason
                        message = {"type": "delta", "id": req_id, "index": d.index,
                                   "text": d.text, "token_ids": d.token_ids}
                        if num_top is not None and d.logprobs:
                            message["logprobs"] = chat_logprobs(
                                d.token_ids, d.logprobs, num_top,
                                llm.tokenizer.token_str,
                                llm.tokenizer.token_bytes).model_dump()["content"]
                        await self.send(message)
                    final = out
        finally:
            ticket.release()
        m = final.metrics if final is not None else None
        usage = UsageInfo.of(len(prompt_ids), sum(generated.values()),
                             m.num_cached_tokens if m else 0)
        timing = {}
        if m is not None and m.first_token_time is not None:
            timing["ttft_s"] = m.first_token_time - m.arrival_time
        if m is not None and m.finished_time is not None:
            timing["e2e_s"] = m.finished_time - m.arrival_time
        choices = []
        for i in sorted(finish):
            choice: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
            if tools.mode != "none":  # the deltas carried the raw text; the calls come here
                content, calls = parse_tool_calls(texts.get(i, ""), tools,
                                                  finish[i] == "length")
                if calls:
                    choice["content"] = content
                    choice["tool_calls"] = [c.model_dump() for c in calls]
                    if finish[i] == "stop":
                        choice["finish_reason"] = "tool_calls"
            choices.append(choice)
        await self.send({"type": "done", "id": req_id, "choices": choices,
                         "usage": usage.model_dump(), "timing": timing})


async def serve_websocket(client: EngineClient, ws: WebSocket) -> None:
    api_key = client.config.api_key
    if api_key is not None:
        header = ws.headers.get("authorization")
        if not (token_matches(header, api_key) or
                token_matches(f"Bearer {ws.query_params.get('api_key', '')}", api_key)):
            await ws.close(code=POLICY_VIOLATION, reason="missing or invalid API key")
            return
    await ws.accept()
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await Connection(client, ws).run()


def _key(req_id: str | int) -> str:
    """A request id as the connection's tables key it: 1 and "1" are two ids, as JSON has them."""
    return repr(req_id)
