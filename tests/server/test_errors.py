"""Bad input gets a 4xx in OpenAI's error shape and never hurts the server."""

from __future__ import annotations

import httpx
import pytest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def test_malformed_json(http):
    for body in (b'{"prompt": ', b"not json", b"", b"[1, 2"):
        r = http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400)


def test_invalid_utf8(http):
    r = http.post(COMPLETIONS, content=b'{"prompt": "\xff\xfe caf\xc3"}',
                  headers={"Content-Type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "seed": -2 ** 63 - 1}, "seed"),
    ({"prompt": "x", "seed": 2 ** 70}, "seed"),
    ({"prompt": "x", "stream": "yes please"}, "stream"),
    ({}, "prompt"),
])
def test_wrong_types_are_400_not_422(http, body, param):
    error = assert_error(http.post(COMPLETIONS, json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", 1e9), ("top_p", 0), ("top_p", 1.5), ("top_k", -5),
    ("min_p", 2), ("max_tokens", 0), ("max_tokens", -5), ("n", 0), ("n", 10 ** 9),
    ("presence_penalty", 9), ("frequency_penalty", -9), ("repetition_penalty", 0),
    ("min_tokens", -1), ("stop_token_ids", [-3]),
])
def test_out_of_range_parameters(http, field, value):
    error = assert_error(http.post(COMPLETIONS, json={"prompt": "x", field: value}), 400)
    assert error["param"] in (field, f"{field}.0"), error  # list fields name the bad item


def test_chat_specific_parameters(http):
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "top_logprobs": 50}), 400,
                 "top_logprobs")
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "top_logprobs": 2}), 400,
                 "top_logprobs")  # without logprobs=true
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "max_completion_tokens": 0}), 400,
                 "max_completion_tokens")
    assert_error(http.post(CHAT, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)


def test_empty_prompt_and_messages(http):
    for prompt in ("", [], [""], [[]]):
        assert_error(http.post(COMPLETIONS, json={"prompt": prompt}), 400, "prompt")
    assert_error(http.post(COMPLETIONS, json={"prompt": ["a", ""]}), 400, "prompt")
    assert_error(http.post(CHAT, json={"messages": []}), 400, "messages")
    assert_error(http.post(CHAT, json={"messages": [{"role": "user", "content": ""}]}), 400,
                 "messages")


def test_token_ids_out_of_vocab(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": [1, 2, 10 ** 9]}), 400, "prompt")
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_context_length(http):
    error = assert_error(http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 9000}), 400,
                         "max_tokens")
    assert "8192" in error["message"]
    long_prompt = "hello " * 9000
    assert_error(http.post(CHAT, json={"messages": [{"role": "user", "content": long_prompt}],
                                       "max_tokens": 10}), 400)


def test_unknown_model_is_404(http):
    error = assert_error(http.post(COMPLETIONS, json={"prompt": "x", "model": "gpt-9"}), 404,
                         "model")
    assert error["code"] == "model_not_found"
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "model": "gpt-9"}), 404)
    # `/v1/models/` names no model (it answered the served one)
    assert_error(http.get("/v1/models/"), 404, "model")


def test_errors_repeating_a_lone_surrogate_stay_4xx(http):
    """JSON may escape a lone surrogate, which UTF-8 cannot carry: an error message that quotes
    it is still the route's error (escaped again), not a 500 from encoding the body."""
    headers = {"Content-Type": "application/json"}
    error = assert_error(http.post(COMPLETIONS, content=b'{"prompt": "hi", "model": "\\ud800"}',
                                   headers=headers), 404, "model")
    assert "\ud800" in error["message"]
    r = http.post("/v1/messages", headers=headers, content=(
        b'{"model": "\\ud800x", "max_tokens": 4, "messages": [{"role": "user", '
        b'"content": "hi"}]}'))
    assert r.status_code == 404 and r.json()["type"] == "error", r.text


@pytest.mark.parametrize("name", ["chat_template", "tokenize", "add_generation_prompt", "tools"])
def test_template_kwargs_cannot_set_the_renderings_own_arguments(http, name):
    """chat_template_kwargs carry template variables: a client's own template (Jinja run on the
    server) or the rendering's arguments are refused, on every route that renders a chat."""
    kwargs = {name: "PWNED {{ messages[0].content }}"}
    for path in (CHAT, "/tokenize"):
        error = assert_error(http.post(path, json={"messages": MESSAGES,
                                                   "chat_template_kwargs": kwargs}),
                             400, "chat_template_kwargs")
        assert repr(name) in error["message"]
    ok = http.post("/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {
        "custom_variable": True}})
    assert ok.status_code == 200, ok.text


def test_tool_results_must_answer_a_call_of_the_conversation(http):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [call]}]
    for result, reason in [({"role": "tool", "content": "42"}, "needs the tool_call_id"),
                           ({"role": "tool", "content": "42", "tool_call_id": "zzz"},
                            "'zzz' names no tool call")]:
        error = assert_error(http.post("/tokenize", json={"messages": [*history, result]}),
                             400, "messages[2].tool_call_id")
        assert reason in error["message"]
    ok = http.post("/tokenize", json={"messages": [
        *history, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]})
    assert ok.status_code == 200, ok.text


def test_a_participants_name_reaches_the_prompt(http):
    """`name` (multi-agent clients set it): rendered as a prefix where the template has no
    place for it, so it is never dropped."""
    def tokens(message: dict) -> list[int]:
        r = http.post("/tokenize", json={"messages": [message]})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    plain = tokens({"role": "user", "content": "hi"})
    bob, ann = tokens({"role": "user", "content": "hi", "name": "Bob"}), tokens(
        {"role": "user", "content": "hi", "name": "Ann"})
    assert len({tuple(plain), tuple(bob), tuple(ann)}) == 3
    assert bob == tokens({"role": "user", "content": "Bob: hi"})


def test_unknown_keys_inside_a_request(http):
    """A request's own settings refuse keys they do not know; pieces of the conversation's
    history (content parts, earlier items and blocks), which clients echo back with keys of
    their own, accept them (logged once by name) rather than fail the conversation."""
    part = {"type": "text", "text": "hi"}
    refused = [
        ("/v1/responses", {"input": "hi", "text": {"format": {"type": "text", "foo": 1}}},
         "foo"),
        (CHAT, {"messages": MESSAGES, "response_format": {"type": "text", "foo": 1}}, "foo"),
        ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": [
            {"role": "user", "content": "hi"}], "tool_choice": {"type": "auto", "name": "g"}},
         "tool_choice"),
        # a block's type picks its model: the error names that block's field
        ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": 7}]}]}, "tool_use_id"),
    ]
    for path, body, word in refused:
        r = http.post(path, json=body)
        assert r.status_code == 400 and word in r.text, (path, r.text)
    model = http.get("/v1/models").json()["data"][0]["id"]
    echoed = [
        (CHAT, {"messages": [{"role": "user", "content": [{**part, "id": "lc_1"}]}],
                "max_tokens": 1}),
        ("/v1/responses", {"input": [{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hi", "logprobs": [], "foo": 1}]}],
            "max_output_tokens": 1}),
        ("/v1/messages", {"model": model, "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "citations": None,
             "cache_control": {"type": "ephemeral"}}]}]}),
    ]
    for path, body in echoed:
        r = http.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
    # /tokenize refuses the message fields chat refuses (its count must be chat's)
    assert_error(http.post("/tokenize", json={"messages": [
        {"role": "user", "content": "hi", "audio": {"id": "a"}}]}), 400, "messages[0].audio")


def test_loosely_typed_values_are_refused(http):
    # true is not 1 (Python's bool is an int): a refused field's neutral value is its own type
    assert_error(http.post(COMPLETIONS, json={"prompt": "x", "best_of": True}), 400, "best_of")
    # token ids as digits only: " 5", "1_0", "05" are not ids (and "5" / "05" would collide)
    for key in (" 5", "1_0", "05", "-1", "５"):
        assert_error(http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1,
                                                  "logit_bias": {key: 1}}), 400, "logit_bias")
    # min_tokens beyond the context is refused even with max_tokens unset
    assert_error(http.post(COMPLETIONS, json={"prompt": "x", "min_tokens": 10 ** 12}), 400,
                 "min_tokens")
    # the deepest failure names the problem: a too-long stop list, not "not a string"
    error = assert_error(http.post(COMPLETIONS, json={"prompt": "x", "stop": ["s"] * 17}), 400)
    assert "at most 16" in error["message"]


def test_unsupported_features(http):
    # a chat stream has no place for prompt log-probs (as vLLM): refused, not dropped
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "stream": True,
                                       "prompt_logprobs": 1}), 400, "prompt_logprobs")
    assert_error(http.post(COMPLETIONS, json={"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_error(http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 0}), 400,
                 "max_tokens")  # 0 only with echo
    # a text-only model names the content part it cannot read (not a failed union of types)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    error = assert_error(http.post(CHAT, json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]}),
        400, "messages.0.content")
    assert error["message"].startswith("content parts of type 'image_url' are not supported")


def test_oversized_bodies_are_413(http, server):
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    error = assert_error(http.post(COMPLETIONS, content=big,
                                   headers={"Content-Type": "application/json"}), 413)
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit must hold while streaming the body in
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"a" * (64 << 10)
        yield b'"}'

    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as fresh:
        r = fresh.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get(COMPLETIONS), 405)


def test_server_survives_bad_input(http):
    r = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert http.get("/health").status_code == 200
