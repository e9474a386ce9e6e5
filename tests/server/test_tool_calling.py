"""Tool calling through the real server: required and named calls validate against the
function's schema, streamed calls equal non-streamed ones, a full agent loop with the `openai`
client, and LangChain's `ChatOpenAI(...).bind_tools(...)`."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def calls_of(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls or []:
        assert call.id.startswith("call_") and call.type == "function"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_calls_are_valid(oai, model, tool_choice, temperature):
    # One call per reply: with parallel calls allowed this small model keeps appending calls
    # until max_tokens (the parallel grammar is checked in tests/structured_output).
    r = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, n=2, seed=5,
                                    tool_choice=tool_choice, temperature=temperature,
                                    parallel_tool_calls=False, max_tokens=150)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = calls_of(choice.message)
        assert calls
        if tool_choice == NAMED:
            assert [name for name, _ in calls] == ["get_weather"]


def test_parallel_tool_calls_false_allows_one_call(oai, model):
    r = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Add 2 and 3, then add 4 and 5."}],
        tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
        max_tokens=150)
    assert len(calls_of(r.choices[0].message)) == 1
    raw = oai.chat.completions.with_raw_response.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
        parallel_tool_calls=False, max_tokens=150).http_response.json()
    # as OpenAI's whole message: no streamed-delta "index" (null was sent)
    assert all(set(call) == {"id", "type", "function"}
               for call in raw["choices"][0]["message"]["tool_calls"])


@pytest.mark.parametrize("strict", [False, True], ids=["loose", "strict"])
@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_streamed_calls_equal_non_streamed(oai, model, tool_choice, strict):
    # strict tools: the client's helper parses each call's arguments as they accumulate, so a
    # chunk with two entries of one index (a header with "" arguments, then the arguments)
    # made it parse "" and fail
    tools = [{**t, "function": {**t["function"], "strict": strict}} for t in TOOLS]
    kw = dict(model=model, messages=ASK, tools=tools, tool_choice=tool_choice, temperature=0,
              parallel_tool_calls=False, max_tokens=120)
    whole = oai.chat.completions.create(**kw).choices[0]
    with oai.chat.completions.stream(**kw) as stream:  # the client's own reassembly
        for event in stream:
            if event.type == "chunk":
                for c in event.chunk.choices:
                    indices = [d.index for d in c.delta.tool_calls or []]
                    assert len(indices) == len(set(indices)), "one entry per call a chunk"
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert streamed.message.content is None and whole.message.content is None
    got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    if strict:
        assert [c.function.parsed_arguments for c in streamed.message.tool_calls] == [
            json.loads(c.function.arguments) for c in whole.message.tool_calls]


def test_a_forced_call_with_a_response_format(oai, model):
    """response_format shapes text, which a forced call leaves none of: accepted (as OpenAI
    does; instructor sends both), the call's grammar rules. vLLM's guided_* fields constrain
    the whole output and stay a 400 naming the field."""
    fmt = {"type": "json_schema", "json_schema": {"name": "add", "schema": SCHEMAS["add"]}}
    r = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0,
                                    tool_choice="required", parallel_tool_calls=False,
                                    response_format=fmt, max_tokens=120)
    assert calls_of(r.choices[0].message) and r.choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                    tool_choice="required", max_tokens=20,
                                    extra_body={"guided_json": SCHEMAS["add"]})
    assert err.value.body["param"] == "guided_json"


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_cut_by_max_tokens_is_a_partial_call(oai, model, stream):
    """As OpenAI returns a call cut by length (and as the named path does): the call with the
    arguments written so far, never the grammar's JSON array as text."""
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
              parallel_tool_calls=False, max_tokens=12)
    if stream:  # (the client's .stream() helper refuses any reply cut by length)
        content, finish, calls = "", None, {}
        for chunk in oai.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                content += c.delta.content or ""
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    name, args = calls.get(d.index, ("", ""))
                    calls[d.index] = (name + (d.function.name or ""),
                                      args + (d.function.arguments or ""))
        got = (content or None, finish, list(calls.values()))
    else:
        choice = oai.chat.completions.create(**kw).choices[0]
        got = (choice.message.content, choice.finish_reason,
               [(c.function.name, c.function.arguments) for c in choice.message.tool_calls])
        assert choice.message.tool_calls[0].id.startswith("call_")
    content, finish, [(name, arguments)] = got
    assert content is None and finish == "length" and name in SCHEMAS
    whole = oai.chat.completions.create(**{**kw, "max_tokens": 150}).choices[0]
    assert whole.message.tool_calls[0].function.arguments.startswith(arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_cut_before_its_name_is_an_empty_reply(oai, model, stream):
    """Cut while the grammar's `[{"name": "` is being written: no call can be named, and that
    text is Pagoda's format, not the model's reply: neither content nor calls."""
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
              max_tokens=3)
    if stream:
        content, finish, calls = "", None, 0
        for chunk in oai.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                content += c.delta.content or ""
                finish = c.finish_reason or finish
                calls += len(c.delta.tool_calls or [])
        assert (content, finish, calls) == ("", "length", 0)
    else:
        choice = oai.chat.completions.create(**kw).choices[0]
        assert choice.message.content is None and not choice.message.tool_calls
        assert choice.finish_reason == "length"


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_auto_and_none_stream_the_same_reply(oai, model, tool_choice):
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0,
              max_tokens=60)
    whole = oai.chat.completions.create(**kw).choices[0]
    content, finish, deltas = "", None, 0
    for chunk in oai.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            deltas += len(c.delta.tool_calls or [])
            finish = c.finish_reason or finish
    assert (content or None) == whole.message.content and finish == whole.finish_reason
    assert deltas == len(whole.message.tool_calls or [])  # one entry per call
    if tool_choice == "none":
        assert whole.message.tool_calls is None and whole.message.content


def test_agent_loop_call_then_tool_result_then_answer(oai, model):
    first = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                        tool_choice=NAMED, temperature=0, max_tokens=100)
    message = first.choices[0].message
    [(name, args)] = calls_of(message)
    call = message.tool_calls[0]
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "name": name,
                      "content": json.dumps({"city": args["city"], "temperature": 21})}]
    final = oai.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                        tool_choice="none", temperature=0, max_tokens=40)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    # the history reached the template: the call and its result add to the bare question
    bare = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                       tool_choice="none", max_tokens=1)
    assert final.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_langchain_bind_tools(server):
    langchain_openai = pytest.importorskip("langchain_openai")  # a dev extra: always installed
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=server.api_key,
                                      model="SmolLM2-135M-Instruct", temperature=0,
                                      max_tokens=120, max_retries=0)

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    bound = llm.bind_tools([add], tool_choice="add")
    question = HumanMessage("What is 2 plus 3?")
    reply = bound.invoke([question])
    [call] = reply.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())
    result = ToolMessage(str(add(**call["args"])), tool_call_id=call["id"])
    answer = llm.bind_tools([add], tool_choice="none").invoke([question, reply, result])
    assert answer.content and not answer.tool_calls
