"""Server-sent events as the OpenAI API streams them: split, assemble, and synthesise.

- `SSESplitter` cuts an upstream byte stream into whole events without waiting for more than one
  event, so pass-through adds no buffering beyond an event's own bytes.
- `StreamAssembler` folds the chunks of a streamed completion into the non-streaming response body,
  which is what the response cache stores.
- `chunks_from_response` turns a stored body back into SSE chunks for a streaming cache hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"
_PIECE_CHARS = 64  # text per synthesised chunk


class SSESplitter:
    """Feed bytes, get back complete events (each including its blank-line terminator)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data.replace(b"\r\n", b"\n")
        events = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            events.append(self._buffer[: end + 2])
            self._buffer = self._buffer[end + 2 :]

    def rest(self) -> bytes:
        return self._buffer


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` payload of one event, or None if it has none."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def encode_event(payload: dict[str, Any], like: bytes = b"") -> bytes:
    """An event carrying `payload`, with the `event:` (and `id:`) lines of the event `like`, if
    given: Responses' and Anthropic's streams name each event's type in one."""
    head = b"".join(line + b"\n" for line in like.split(b"\n")
                    if line.startswith((b"event:", b"id:")))
    return head + b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(slots=True)
class _Choice:
    text: str = ""
    role: str = "assistant"
    finish_reason: str | None = None


@dataclass(slots=True)
class StreamAssembler:
    """Accumulates streamed chunks of one response. `complete` is False if anything was seen
    that the assembled body could not faithfully reproduce (tool calls, log-probs, errors)."""

    chat: bool
    head: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, _Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    complete: bool = True
    done: bool = False

    def add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.complete = False
            return
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in chunk and name not in self.head:
                self.head[name] = chunk[name]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for raw in chunk.get("choices") or []:
            choice = self.choices.setdefault(int(raw.get("index", 0)), _Choice())
            if raw.get("logprobs"):
                self.complete = False
            if self.chat:
                delta = raw.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.complete = False
                choice.role = delta.get("role") or choice.role
                choice.text += delta.get("content") or ""
            else:
                choice.text += raw.get("text") or ""
            if raw.get("finish_reason"):
                choice.finish_reason = raw["finish_reason"]

    def body(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            if self.chat:
                message = {"role": c.role, "content": c.text}
                choices.append(
                    {"index": index, "message": message, "finish_reason": c.finish_reason}
                )
            else:
                choices.append(
                    {"index": index, "text": c.text, "logprobs": None,
                     "finish_reason": c.finish_reason}
                )
        body = {**self.head, "object": "chat.completion" if self.chat else "text_completion"}
        body["choices"] = choices
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def can_rechunk(body: dict[str, Any]) -> bool:
    """Whether `chunks_from_response` reproduces `body` faithfully (text only: no tool calls, no
    log-probs). The cache stores only such bodies, so a streaming hit never loses anything."""
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        if choice.get("logprobs") or message.get("tool_calls") or message.get("function_call"):
            return False
    return isinstance(body.get("choices"), list)


def chunks_from_response(body: dict[str, Any], chat: bool, include_usage: bool) -> list[bytes]:
    """SSE events (ending with [DONE]) that stream the stored non-streaming `body`."""
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint") if k in body}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    events = []
    for choice in body.get("choices", []):
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            text = message.get("content") or ""
            first = {"role": message.get("role", "assistant"), "content": ""}
            events.append(encode_event({**head, "choices": [
                {"index": index, "delta": first, "finish_reason": None}]}))
        else:
            text = choice.get("text") or ""
        for start in range(0, len(text), _PIECE_CHARS):
            piece = text[start : start + _PIECE_CHARS]
            inner = {"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None}
            events.append(encode_event({**head, "choices": [
                {"index": index, **inner, "finish_reason": None}]}))
        last = {"delta": {}} if chat else {"text": "", "logprobs": None}
        events.append(encode_event({**head, "choices": [
            {"index": index, **last, "finish_reason": choice.get("finish_reason")}]}))
    if include_usage and body.get("usage") is not None:
        events.append(encode_event({**head, "choices": [], "usage": body["usage"]}))
    events.append(DONE)
    return events
