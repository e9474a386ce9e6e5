"""No request field is silently ignored: each is implemented, or a 400 naming it."""

from __future__ import annotations

import logging

import pytest

from pagoda.sampling.params import SamplingParams, SamplingParamsError
from pagoda.server.chat_protocol import ChatCompletionRequest
from pagoda.server.errors import APIError
from pagoda.server.field_policy import ACCEPTED, REFUSED
from pagoda.server.protocol import CompletionRequest
from pagoda.server.request_params import chat_params, completion_params
from pagoda.server.tool_prompt import tool_use

MESSAGES = [{"role": "user", "content": "hi"}]
REALISTIC = {"modalities": ["text", "audio"], "service_tier": "flex", "best_of": 3,
             "length_penalty": 2.0, "spaces_between_special_tokens": False, "priority": 5,
             "audio": {"voice": "alloy", "format": "mp3"}, "store": True,
             "reasoning_effort": "high", "echo": True, "use_beam_search": True}


def chat(**fields) -> SamplingParams:
    request = ChatCompletionRequest(messages=fields.pop("messages", MESSAGES), **fields)
    return chat_params(request, tool_use(request))


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_each_unimplemented_field_is_a_400_naming_it(field):
    value = REALISTIC.get(field, "x")
    with pytest.raises(APIError) as err:
        chat(**{field: value})
    assert err.value.status == 400 and err.value.param == field
    if field != "echo":  # completions implements echo
        with pytest.raises(APIError) as err:
            completion_params(CompletionRequest(prompt="hi", **{field: value}))
        assert err.value.param == field


@pytest.mark.parametrize("field, neutral", [("store", False), ("modalities", ["text"]),
                                            ("service_tier", "auto"), ("best_of", 1),
                                            ("functions", None), ("priority", 0),
                                            ("spaces_between_special_tokens", True)])
def test_neutral_values_of_unimplemented_fields_pass(field, neutral):
    chat(**{field: neutral})


def test_accepted_fields_pass_and_unknown_ones_are_refused_unless_neutral(caplog):
    chat(**dict.fromkeys(ACCEPTED, "v"))
    chat(some_future_field=None, another_one=False)  # neutral values change nothing
    with pytest.raises(APIError) as err:
        chat(some_future_field=1)
    assert err.value.param == "some_future_field" and "unknown field" in err.value.message
    with caplog.at_level(logging.WARNING, logger="pagoda.server.field_policy"):
        chat(messages=[{"role": "assistant", "content": "x", "refusal_note": "n"},
                       {"role": "user", "content": "hi", "refusal_note": "m"}])
    assert [r.getMessage() for r in caplog.records].count(
        "ignoring the unknown request field 'messages[].refusal_note' (logged once)") == 1


def test_message_level_fields():
    with pytest.raises(APIError) as err:
        chat(messages=[{"role": "user", "content": "hi", "audio": {"id": "a"}}])
    assert err.value.param == "messages[0].audio"


def test_logit_bias_and_allowed_token_ids_reach_the_sampler():
    params = chat(logit_bias={"12": 5.5, "7": -100}, allowed_token_ids=[1, 2])
    assert params.logit_bias == {12: 5.5, 7: -100} and params.allowed_token_ids == [1, 2]
    with pytest.raises(APIError) as err:
        chat(logit_bias={"hello": 1})
    assert err.value.param == "logit_bias"
    with pytest.raises(SamplingParamsError) as err:
        chat(logit_bias={"12": 101})
    assert err.value.param == "logit_bias"


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "integer"}, "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: x"}, "guided_grammar"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "guided_json": {"type": "object"}}, "guided_json"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_schema"}}, "response_format"),  # checked all the same
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
])
def test_conflicting_or_bad_constraints_are_a_400(fields, param):
    with pytest.raises((APIError, SamplingParamsError)) as err:
        chat(**fields)
    assert err.value.param == param


@pytest.mark.parametrize("fields, kind", [
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer"}, "strict": True}}}, "json"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar"),
    ({"guided_json": {"type": "integer"}}, "json"),
    ({"guided_regex": "[0-9]+"}, "regex"),
    ({"guided_choice": ["x"]}, "choice"),
    ({"guided_grammar": 'root ::= "b"', "guided_decoding_backend": "xgrammar"}, "grammar"),
])
def test_every_constraint_spelling_becomes_one_constraint(fields, kind):
    constraint = chat(**fields).structured_outputs
    assert (constraint.kind if constraint else None) == kind
    got = completion_params(CompletionRequest(prompt="hi", **fields)).structured_outputs
    assert (got.kind if got else None) == kind
