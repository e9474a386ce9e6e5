"""OpenAI's Responses API with the official `openai` client against the real server."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from pagoda.sampling.params import SamplingParams
from tests.server.conftest import chat_ids

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {
               "type": "string", "maxLength": 30}}, "required": ["city"]}}


def test_create_equals_the_chat_route_greedy(oai, offline):
    r = oai.responses.create(model=MODEL, input="What is the capital of France?",
                             instructions="You are terse.", max_output_tokens=12,
                             temperature=0)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    want = offline(chat_ids(offline.tokenizer, messages),
                   SamplingParams(max_tokens=12, temperature=0))[0]
    assert r.output_text == want and r.id.startswith("resp_")
    assert r.usage.input_tokens == len(chat_ids(offline.tokenizer, messages))
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.completed_at is None
    else:
        assert r.completed_at >= r.created_at


def test_stream_equals_create(oai):
    kw = dict(model=MODEL, input=[{"role": "user", "content": "Name three colours."}],
              max_output_tokens=20, temperature=0)
    whole = oai.responses.create(**kw)
    kinds, text = [], ""
    with oai.responses.stream(**kw) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = ev.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == f"response.{whole.status}" and final.status == whole.status
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert text == whole.output_text == final.output_text


def test_json_schema_format(oai):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"]}
    r = oai.responses.create(model=MODEL, input="Reply in JSON: what is the capital of France?",
                             temperature=0, max_output_tokens=40, text={"format": {
                                 "type": "json_schema", "name": "c", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_and_their_outputs(oai, stream):
    kw = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER], temperature=0,
              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60)
    if stream:
        with oai.responses.stream(**kw) as s:
            for _ in s:
                pass
            r = s.get_final_response()
    else:
        r = oai.responses.create(**kw)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow = oai.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none",
                                  temperature=0, max_output_tokens=20, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.output_text


@pytest.mark.parametrize("fields, param", [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "high"}}, "reasoning"), ({"truncation": "auto"}, "truncation"),
    ({"made_up": 1}, "made_up"), ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    # errors found once the request is a chat name the Responses fields the client wrote
    ({"max_output_tokens": 10 ** 6}, "max_output_tokens"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
     "input")])
def test_refused_fields_are_400s_naming_them(server, fields, param):
    r = httpx.post(server.url + "/v1/responses", headers=server.headers,
                   json={"model": MODEL, "input": "hi", **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_image_input_is_refused_by_name(server):
    image = {"type": "input_image", "image_url": "https://example.com/cat.png"}
    r = httpx.post(server.url + "/v1/responses", headers=server.headers, json={
        "model": MODEL, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"}, image]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input.0.content", r.text
    assert "content parts of type 'input_image' are not supported" in r.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["message", "function_call"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_cut_reply_marks_its_item_incomplete(oai, stream, kind):
    kw = dict(model=MODEL, input="Tell me a long story about a lighthouse.", temperature=0,
              max_output_tokens=5)
    if kind == "function_call":  # a forced call cut mid-arguments
        kw.update(input="Weather in Paris?", tools=[WEATHER],
                  tool_choice={"type": "function", "name": "get_weather"})
    if stream:
        with oai.responses.stream(**kw) as s:
            events = list(s)
        # OpenAI ends a cut stream with response.incomplete (get_final_response() raises)
        assert events[-1].type == "response.incomplete"
        r = events[-1].response
        done = [ev.item for ev in events if ev.type == "response.output_item.done"]
        assert [item.status for item in done] == ["incomplete"]
    else:
        r = oai.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [(item.type, item.status) for item in r.output] == [(kind, "incomplete")]
    assert r.usage.output_tokens == 5


def test_ignore_eos_and_a_forced_call_with_a_text_format(oai):
    """Fields real clients send: guidellm's `ignore_eos` (vLLM's extra, as on chat), and
    instructor's RESPONSES_TOOLS mode's named tool_choice together with text.format (the format
    governs text, which a forced call leaves none of: the call's grammar rules, as on OpenAI)."""
    r = oai.responses.create(model=MODEL, input="Say hi.", max_output_tokens=24, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.output_tokens == 24
    schema = WEATHER["parameters"]
    r = oai.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER], temperature=0,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "get_weather", "schema": schema,
                         "strict": True}})
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), schema)
