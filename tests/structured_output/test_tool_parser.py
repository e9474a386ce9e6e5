"""Tool-call parsing: whole replies, and streams cut at every possible place agree."""

from __future__ import annotations

import json
import random

import pytest

from pagoda.server.chat_protocol import ChatCompletionRequest
from pagoda.server.tool_parser import ToolCallStream, parse_tool_calls
from pagoda.server.tool_prompt import template_messages, tool_constraint, tool_use

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}}}}}]


def use_of(tool_choice="auto", **kw):
    return tool_use(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                          tools=TOOLS, tool_choice=tool_choice, **kw))


def call(name, **args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


AUTO_CASES = [
    (f"Sure. {call('get_weather', city='Paris')}\n{call('add', a=1)} done",
     "Sure. \n done", [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]),
    ("no calls here <tool but <tool_cal", "no calls here <tool but <tool_cal", []),
    ('{"name": "add", "arguments": {"a": 2}}', None, [("add", {"a": 2})]),
    ('[{"name": "add", "parameters": {"a": 2}}]', None, [("add", {"a": 2})]),
    ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ('  padded  \n', "padded", []),
    ('<tool_call>{"name": "add", "arguments": {"a": 5}}', None, [("add", {"a": 5})]),
    ('{"not": "a call"}', '{"not": "a call"}', []),
]


def test_arguments_keep_the_characters_the_model_wrote():
    """OpenAI's arguments are the model's JSON text: "Zürich", not "Z\\u00fcrich"."""
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich 東京"}}</tool_call>'
    for use in (use_of(), use_of("required")):
        reply = text if use.mode == "auto" else \
            '[{"name": "get_weather", "arguments": {"city": "Zürich 東京"}}]'
        _, calls = parse_tool_calls(reply, use)
        assert calls[0].function.arguments == '{"city": "Zürich 東京"}'


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "one-call"])
@pytest.mark.parametrize("text, content, calls", AUTO_CASES)
def test_auto_parse_and_every_stream_cut_agree(text, content, calls, parallel):
    """With parallel_tool_calls false a reply's first call is its only one."""
    use = use_of(parallel_tool_calls=parallel)
    calls = calls if parallel else calls[:1]
    got_content, got_calls = parse_tool_calls(text, use)
    assert got_content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls)
    rng = random.Random(0)
    for _ in range(30):
        stream, streamed, deltas, i = ToolCallStream(use), "", [], 0
        while i < len(text):
            k = rng.randint(1, 6)
            piece, ds = stream.feed(text[i:i + k])
            streamed, deltas, i = streamed + piece, deltas + ds, i + k
        piece, ds = stream.finish()
        streamed, deltas = streamed + piece, deltas + ds
        assert (streamed or None) == content
        assert stream.made_calls == bool(calls)
        merged: dict[int, list[str]] = {}
        for d in deltas:
            entry = merged.setdefault(d.index, ["", ""])
            if d.function.name:
                assert d.id.startswith("call_") and not entry[0]  # the name comes first, once
                entry[0] = d.function.name
            entry[1] += d.function.arguments or ""
        assert [(n, json.loads(a)) for n, a in merged.values()] == calls


def test_named_streams_arguments_as_they_come():
    use = use_of({"type": "function", "function": {"name": "add"}})
    stream = ToolCallStream(use)
    first, second = stream.feed('{"a"'), stream.feed(': 3}')
    assert first[0] == "" and first[1][0].function.name == "add"
    assert [d.function.arguments for d in first[1] + second[1]] == ['{"a"', ": 3}"]
    assert parse_tool_calls('{"a": 3}', use)[1][0].function.arguments == '{"a": 3}'


def test_required_schema_and_parallel_flag():
    schema = tool_constraint(use_of("required")).schema
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert len(schema["items"]["anyOf"]) == 2
    assert tool_constraint(use_of("required", parallel_tool_calls=False)).schema["maxItems"] == 1
    assert tool_constraint(use_of("auto")) is None and tool_constraint(use_of("none")) is None
    named = tool_constraint(use_of({"type": "function", "function": {"name": "get_weather"}}))
    assert named.schema == TOOLS[0]["function"]["parameters"]


def test_generic_prompt_renders_tools_history_and_results():
    use = use_of()
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{
                   "id": "call_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "call_2", "content": "warm"}]
    out, extra = template_messages(history, use, template_knows_tools=False)
    assert extra == {} and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in out[0][
        "content"]
    assert out[2]["content"] == call("get_weather", city="Paris")
    assert out[3]["content"] == ("<tool_response>\nsunny\n</tool_response>\n"
                                 "<tool_response>\nwarm\n</tool_response>")
    none_out, _ = template_messages(history, use_of("none"), template_knows_tools=False)
    assert none_out[0]["content"] == "Be brief."
    same, extra = template_messages(history, use, template_knows_tools=True)
    assert same is history and [t["function"]["name"] for t in extra["tools"]] == [
        "get_weather", "add"]


def test_a_required_reply_cut_by_length_is_a_partial_call_and_only_then():
    use = use_of("required")
    cut = '[{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": {"a'
    content, calls = parse_tool_calls(cut, use, cut=True)
    assert content is None
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("add", '{"a": 2, "b": 3}'), ("add", '{"a')]
    # a stop string ended it: nothing was cut by the budget, so no call is passed on as finished
    assert parse_tool_calls(cut, use) == (cut, [])
    # cut inside the name: no call to name, and the grammar's array is not the model's text
    assert parse_tool_calls('[{"name": "ad', use, cut=True) == (None, [])
    stream = ToolCallStream(use)
    assert stream.feed(cut) == ("", [])
    text, deltas = stream.finish(cut=True)
    assert text == "" and [(d.index, d.function.name) for d in deltas] == [(0, "add"), (1, "add")]
