"""Tool calls out of generated text: whole replies, and streams of deltas.

Formats (chosen by `tool_choice`, the same for every model since the generic tool prompt is
Hermes-style; see docs/structured_output.md):
- auto: Hermes blocks `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` anywhere in
  the reply (text around them is the content), or a reply that is only a JSON object (or list
  of objects) with a known `name` and `arguments` (or `parameters`): the JSON format.
- required: the grammar made the reply a JSON array of {"name", "arguments"} objects.
- named: the grammar made the reply the named function's arguments object.
A block that does not parse as a call of a known function stays in the content: nothing the
model wrote is dropped. Streams send content as it comes, minus any text that may be the start
of a `<tool_call>` tag, and each call as one delta entry carrying its id/type/name and its first
arguments (later arguments follow in entries with only the index): a chunk never holds two
entries of one index, which clients' stream accumulators (openai's `.stream()` helper,
instructor's partial streaming) take for two calls.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from pagoda.server.chat_protocol import DeltaFunctionCall, DeltaToolCall
from pagoda.server.protocol import FunctionCall, ToolCall
from pagoda.server.tool_prompt import ToolUse

START, END = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def new_call(name: str, arguments: Any) -> ToolCall:
    # as written: "Zürich", not "Z\u00fcrich" (json.dumps escapes non-ASCII unless told)
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(name=name, arguments=text))


def _as_calls(value: Any, names: set[str]) -> list[ToolCall] | None:
    """[calls] if `value` is a call object or a list of them (known names only), else None."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if not isinstance(args, dict):
            return None
        calls.append(new_call(item["name"], args))
    return calls or None


# the call a `required` reply was writing when max_tokens cut it: the grammar writes "name"
# first (schema order), so a complete name and the arguments' first characters
_CUT_CALL = re.compile(
    r'\{\s*"name"\s*:\s*"([A-Za-z0-9_.-]+)"(?:\s*,\s*(?:"arguments"\s*:\s*(.*))?)?', re.S)


def _cut_calls(text: str, names: set[str]) -> list[ToolCall]:
    """The calls of a `required` reply cut short: each complete one, then the one being written
    with its arguments so far (as OpenAI returns a call cut by length, and as the named path
    does), so the grammar's array never reaches the client as text."""
    start = text.find("[")
    if start < 0:
        return []
    decoder, pos, calls = json.JSONDecoder(), start + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        complete = _as_calls(value, names)
        if not complete:
            return calls
        calls += complete
    cut = _CUT_CALL.match(text, pos)
    if cut and cut.group(1) in names:
        calls.append(new_call(cut.group(1), cut.group(2) or ""))
    return calls


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def parse_tool_calls(text: str, use: ToolUse, cut: bool = False
                     ) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply; `cut`: max_tokens ended it (finish reason "length"),
    so a `required` array may stop mid-call (a stop string's cut is not completed this way:
    its calls would be passed on as finished)."""
    if use.mode == "named":
        return None, [new_call(use.named, text)]
    if use.mode == "required":
        calls = _as_calls(_loads(text), use.names) or (
            _cut_calls(text, use.names) if cut else None)
        if calls:
            return None, calls
        # cut before a call's name was complete: no call to return, and the grammar's array
        # is not the model's text (an empty reply, finish reason "length")
        return (None, []) if cut else (text, [])
    if use.mode == "none":
        return text, []
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    for match in BLOCK.finditer(text):
        parsed = _as_calls(_loads(match.group(1).strip()), use.names)
        if parsed:
            content.append(text[pos:match.start()])
            calls += parsed
            pos = match.end()
    content.append(text[pos:])
    if not calls and text.lstrip().startswith(("{", "[")):
        calls = _as_calls(_loads(text.strip()), use.names) or []
        if calls:
            content = []
    joined = "".join(content).strip()
    return (joined or None, calls if use.parallel else calls[:1])


class ToolCallStream:
    """One choice's stream: `feed(text)` and `finish()` return (content, tool-call deltas)."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.pending = ""  # text held back: a possible tag start, a call body
        self.spaces = ""  # trailing whitespace of the content sent so far
        self.in_call = False
        self.num_calls = 0
        self.started = False  # any content sent yet (leading whitespace is dropped)
        self.json_reply: bool | None = None  # auto: the reply opened with '{' or '['

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        mode = self.use.mode
        if mode == "none":
            return text, []
        if mode == "named":
            if not self.num_calls:
                return "", self._open(new_call(self.use.named, text))
            if text:
                return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
            return "", []
        self.pending += text
        if mode == "required":
            return "", []
        if self.json_reply is None and self.pending.strip():
            self.json_reply = self.pending.lstrip().startswith(("{", "["))
        if self.json_reply:
            return "", []
        return self._scan()

    def finish(self, cut: bool = False) -> tuple[str, list[DeltaToolCall]]:
        """The rest, at the reply's end (`cut`: as in `parse_tool_calls`)."""
        mode, text = self.use.mode, self.pending
        self.pending = ""
        if mode in ("none", "named"):
            return "", []
        if mode == "required" or self.json_reply:
            content, calls = parse_tool_calls(text, self.use, cut)
            deltas = [d for c in calls for d in self._send(c)]
            return (content or "") if not calls else "", deltas
        if self.in_call:  # a block the reply ended inside (no closing tag)
            calls = _as_calls(_loads(text.strip()), self.use.names)
            if calls:
                return "", [d for c in calls for d in self._send(c)]
            text = START + text
        return self._content(text), []

    @property
    def made_calls(self) -> bool:
        return self.num_calls > 0

    def _scan(self) -> tuple[str, list[DeltaToolCall]]:
        content, deltas = "", []
        while True:
            if self.in_call:
                end = self.pending.find(END)
                if end < 0:
                    break
                body, self.pending = self.pending[:end], self.pending[end + len(END):]
                self.in_call = False
                calls = _as_calls(_loads(body.strip()), self.use.names)
                if calls:
                    deltas += [d for c in calls for d in self._send(c)]
                else:
                    content += self._content(START + body + END)
                continue
            start = self.pending.find(START)
            if start >= 0:
                content += self._content(self.pending[:start])
                self.pending = self.pending[start + len(START):]
                self.in_call = True
                continue
            keep = _partial_tag(self.pending)
            cut = len(self.pending) - keep
            content += self._content(self.pending[:cut])
            self.pending = self.pending[cut:]
            break
        return content, deltas

    def _content(self, text: str) -> str:
        """Text to send now. Whitespace before a call, or at either end of the reply, is what
        `parse_tool_calls` strips, so trailing whitespace waits to see what follows it."""
        text = self.spaces + text
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.spaces = text[len(body):]
        if body:
            self.started = True
        return body

    def _open(self, call: ToolCall) -> list[DeltaToolCall]:
        """The call's first entry: id, type, name and the arguments known so far."""
        index = self.num_calls
        self.num_calls += 1
        return [DeltaToolCall(index=index, id=call.id, type="function",
                              function=DeltaFunctionCall(name=call.function.name,
                                                         arguments=call.function.arguments))]

    def _send(self, call: ToolCall) -> list[DeltaToolCall]:
        if self.num_calls and not self.use.parallel:  # parallel_tool_calls false: the first only
            return []
        return self._open(call)


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the start tag."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if text.endswith(START[:n]):
            return n
    return 0
