"""Tools into the prompt, and the constraint that `tool_choice` implies.

A chat template that knows tools (its source mentions `tools`) renders them itself, and gets the
conversation's `tool_calls` and `tool` turns as OpenAI-shaped dicts. A template that does not
(SmolLM2's, Gemma 3's) gets Pagoda's generic Hermes-style tool prompt: the functions as JSON
lines inside <tools></tools> in the system turn, calls written as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier calls are rendered that way
in assistant turns and tool results as <tool_response> blocks in a user turn (so templates
that only know user/assistant/system still accept the history); a message's `name` (a
participant's, as multi-agent clients send) prefixes a user turn's content as "name: ".

`tool_choice` "required" constrains the reply to a JSON array of calls (at least one; exactly
one when `parallel_tool_calls` is false) whose arguments follow each function's schema; a named
function constrains it to that function's arguments object. "auto" leaves the model free and
the parser (`tool_parser.py`) finds the calls (only the first when `parallel_tool_calls` is
false, which the generic prompt also asks for); "none" renders no tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.server.chat_protocol import ChatCompletionRequest, NamedToolChoice, Tool
from pagoda.server.errors import APIError
from pagoda.structured_output.grammar import ConstraintError, check_nesting

TOOL_PROMPT = (
    "You can call functions to help with the user's request. The functions are described by "
    "JSON schemas inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n'
    "</tool_call>\nIf no function is needed, answer directly.")


def chat_tools(specs: list[tuple[str, str | None, dict[str, Any] | None]]) -> list[dict[str, Any]]:
    """(name, description, parameters) triples as OpenAI chat `tools`: how the Messages and
    Responses surfaces hand their own tool shapes to the chat route."""
    return [{"type": "function", "function": {
        "name": name, "description": description, "parameters": parameters}}
        for name, description, parameters in specs]


def named_choice(name: str) -> dict[str, Any]:
    """OpenAI chat's `tool_choice` naming one function."""
    return {"type": "function", "function": {"name": name}}


@dataclass(frozen=True)
class ToolUse:
    mode: str  # "none", "auto", "required" or "named"
    tools: tuple[Tool, ...]
    named: str | None = None
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    @property
    def forced(self) -> bool:
        """required / named: the grammar writes calls, never text meant for the client."""
        return self.mode in ("required", "named")


def tool_use(request: ChatCompletionRequest) -> ToolUse:
    return choose_tools(request.tools, request.tool_choice, request.parallel_tool_calls)


def choose_tools(offered: list[Tool] | None, choice: str | NamedToolChoice | None,
                 parallel: bool | None) -> ToolUse:
    """The tools and `tool_choice` of a request, checked (unique names, valid schemas, a named
    choice among the tools); no choice means "auto" with tools and "none" without."""
    tools = tuple(offered or ())
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", "tools")
    for i, tool in enumerate(tools):  # whether or not a constraint will compile it
        _check_parameters(i, tool)
    if choice is None:
        mode = "auto" if tools else "none"
    elif isinstance(choice, str):
        mode = choice
    else:
        mode = "named"
    if mode in ("required", "named") and not tools:
        raise APIError(400, f"tool_choice {mode!r} needs tools", "tool_choice")
    named = None
    if mode == "named":
        named = choice.function.name
        if named not in names:
            raise APIError(400, f"tool_choice names {named!r}, which is not in tools",
                           "tool_choice")
    return ToolUse(mode, tools, named, parallel is not False)


def _check_parameters(index: int, tool: Tool) -> None:
    """A tool's `parameters` must be a JSON Schema (as OpenAI checks): the model is shown it,
    and `required` / named tool choice compile it."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        check_nesting(_parameters(tool), f"tools[{index}].function.parameters")
    except ConstraintError as exc:
        raise APIError(400, str(exc), f"tools[{index}].function.parameters") from None
    try:
        Draft202012Validator.check_schema(_parameters(tool))
    except SchemaError as exc:
        raise APIError(400, f"tools[{index}].function.parameters is not a valid JSON Schema: "
                       f"{exc.message}", f"tools[{index}].function.parameters") from None


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_constraint(use: ToolUse) -> StructuredOutputs | None:
    if use.mode == "named":
        tool = next(t for t in use.tools if t.function.name == use.named)
        return StructuredOutputs.json_schema(_parameters(tool))
    if use.mode != "required":
        return None
    calls = [{"type": "object", "properties": {
        "name": {"const": t.function.name}, "arguments": _parameters(t)},
        "required": ["name", "arguments"]} for t in use.tools]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not use.parallel:
        schema["maxItems"] = 1
    return StructuredOutputs.json_schema(schema)


def template_messages(messages: list[dict[str, Any]], use: ToolUse,
                      template_knows_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages for the chat template, extra template arguments)."""
    if template_knows_tools:
        tools = [t.model_dump(exclude_none=True) for t in use.tools] if use.mode != "none" else None
        return messages, ({"tools": tools} if tools else {})
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [_call_block(c) for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m["content"] else []) + blocks)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        elif m.get("name") and m["role"] == "user":
            # a participant's name, which these templates have no place for (not on assistant
            # turns: a small model would learn to open its own replies with a name)
            out.append({"role": m["role"], "content": f"{m['name']}: {m['content'] or ''}"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if use.mode != "none" and use.tools:
        lines = "\n".join(json.dumps(t.function.model_dump(exclude_none=True))
                          for t in use.tools)
        prompt = TOOL_PROMPT.format(tools=lines)
        if not use.parallel:
            prompt += "\nCall at most one function in a reply."
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _call_block(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except (json.JSONDecodeError, RecursionError):  # rendered as the client wrote it
        arguments = fn.get("arguments")
    body = json.dumps({"name": fn.get("name"), "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>"
