"""Anthropic's Messages API with the official `anthropic` client against the real server:
create, stream, count_tokens, tool use, x-api-key auth and Anthropic-shaped errors."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from pagoda.sampling.params import SamplingParams
from tests.server.conftest import chat_ids

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0}  # this client version no longer has a temperature argument
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"]}}


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=server.api_key, max_retries=0)


def test_create_equals_the_chat_route_greedy(claude, offline):
    msg = claude.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=ASK,
                                 system="You are terse.")
    messages = [{"role": "system", "content": "You are terse."}] + ASK
    want = offline(chat_ids(offline.tokenizer, messages),
                   SamplingParams(max_tokens=12, temperature=0))[0]
    assert msg.content[0].type == "text" and msg.content[0].text == want
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.role == "assistant"
    assert msg.usage.input_tokens == len(chat_ids(offline.tokenizer, messages))
    assert msg.id.startswith("msg_")


def test_a_final_assistant_turn_is_continued(claude, offline):
    """Anthropic's prefill: a last assistant message is continued, not answered anew."""
    prefill = ASK + [{"role": "assistant", "content": "The capital of France is"}]
    msg = claude.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=prefill)
    text = offline.tokenizer.apply_chat_template(prefill, add_generation_prompt=False,
                                                 continue_final_message=True)
    ids = offline.tokenizer.encode(text, add_special_tokens=False)
    assert msg.content[0].text == offline(ids, SamplingParams(max_tokens=8, temperature=0))[0]
    assert msg.usage.input_tokens == len(ids)
    assert claude.messages.count_tokens(model=MODEL, messages=prefill).input_tokens == len(ids)


def test_stream_equals_create(claude):
    kw = dict(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ASK)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # the same prompt again: message_start reports its prefix-cache hits, as the reply would
    assert final.usage.cache_read_input_tokens > 0


def test_stop_sequences_report_the_sequence(claude):
    msg = claude.messages.create(model=MODEL, max_tokens=40, extra_body=GREEDY, messages=ASK,
                                 stop_sequences=["Paris"])
    if msg.stop_reason == "stop_sequence":
        assert msg.stop_sequence == "Paris" and "Paris" not in msg.content[0].text
    else:  # the model never said it
        assert msg.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens(claude, offline):
    count = claude.messages.count_tokens(model=MODEL, messages=ASK, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}] + ASK
    assert count.input_tokens == len(chat_ids(offline.tokenizer, messages))


def test_text_blocks_are_joined_one_per_line(claude, offline):
    """Several text blocks of a turn (or of the system prompt) reach the model one per line, as
    the chat route joins text parts, not glued into one word."""
    blocks = [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]
    system = [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]
    count = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": blocks}], system=system)
    messages = [{"role": "system", "content": "Be\nbrief."},
                {"role": "user", "content": "Name a colour.\nOne word."}]
    assert count.input_tokens == len(chat_ids(offline.tokenizer, messages))


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip(claude, stream):
    kw = dict(model=MODEL, max_tokens=80, extra_body=GREEDY, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather"},
              messages=[{"role": "user", "content": "Weather in Paris?"}])
    if stream:
        with claude.messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = claude.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    [call] = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input["city"], str)
    assert call.id.startswith("toolu_")
    reply = claude.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY, tools=[WEATHER],
                                   tool_choice={"type": "none"}, messages=[
        kw["messages"][0], {"role": "assistant", "content": msg.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "sunny, 21 C"}]}])
    assert reply.content and reply.content[0].type == "text"


def test_errors_are_in_anthropics_shape(server, claude):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=0, messages=ASK)
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-9", max_tokens=5, messages=ASK)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0
                            ).messages.create(model=MODEL, max_tokens=5, messages=ASK)
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": server.api_key},
                   json={"model": MODEL, "max_tokens": 5, "messages": ASK, "thinking": {}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as err:  # extended thinking, by name
        claude.messages.create(model=MODEL, max_tokens=5, messages=ASK,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" in err.value.body["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": server.api_key},
                   json={"model": MODEL, "max_tokens": 5, "messages": [
                       {"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    # named, not reported as a failed union of string and blocks
    assert "content parts of type 'image' are not supported" in r.json()["error"]["message"]
    # the body limit answers before any route runs, in the route's shape too
    with pytest.raises(anthropic.APIStatusError) as err:
        claude.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": "x" * (5 << 20)}])
    assert err.value.status_code == 413
    assert err.value.body["error"]["type"] == "request_too_large"
    ok = httpx.post(server.url + "/v1/messages", headers={"x-api-key": server.api_key},
                    json={"model": MODEL, "max_tokens": 2, "messages": ASK})
    assert ok.status_code == 200 and ok.json()["type"] == "message"


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
def test_thinking_off_is_accepted(server, thinking):
    """Anthropic's "off" value (some clients always send it), and null, change nothing."""
    kw = dict(model=MODEL, max_tokens=5, messages=ASK, temperature=0)
    url, headers = server.url + "/v1/messages", {"x-api-key": server.api_key}
    plain = httpx.post(url, headers=headers, json=kw).json()
    r = httpx.post(url, headers=headers, json={**kw, "thinking": thinking})
    assert r.status_code == 200 and r.json()["content"] == plain["content"], r.text
    count = httpx.post(server.url + "/v1/messages/count_tokens",
                       headers={"x-api-key": server.api_key},
                       json={"model": MODEL, "messages": ASK, "thinking": thinking})
    assert count.status_code == 200 and count.json()["input_tokens"] > 0
