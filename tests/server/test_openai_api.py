"""The official `openai` client (sync, async, streaming) against a real `pagoda serve`."""

from __future__ import annotations

import httpx
import openai
import pytest

from pagoda.sampling.params import SamplingParams
from tests.server.conftest import chat_ids

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_health_was_503_while_loading(server):
    assert server.health_codes[0] == 503 and server.health_codes[-1] == 200


def test_models(oai, server):
    models = oai.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    raw = httpx.get(server.url + "/v1/models", headers=server.headers).json()
    assert raw["data"][0]["max_model_len"] == 8192


def test_completion_greedy_matches_offline(oai, model, offline):
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    want = offline(PROMPT, SamplingParams(max_tokens=16, temperature=0))[0]
    assert got.choices[0].text == want
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.system_fingerprint and got.created > 0
    assert got.usage.completion_tokens == 16
    assert got.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert got.usage.total_tokens == got.usage.prompt_tokens + 16


def test_prompt_forms_agree(oai, model, offline):
    ids = offline.tokenizer.encode(PROMPT)
    texts = [oai.completions.create(model=model, prompt=p, max_tokens=8, temperature=0)
             .choices[0].text for p in (PROMPT, [PROMPT], ids)]
    assert texts[0] == texts[1] == texts[2]


def test_chat_greedy_matches_offline(oai, model, offline):
    got = oai.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=20,
                                      temperature=0)
    ids = chat_ids(offline.tokenizer, CHAT)
    want = offline(ids, SamplingParams(max_tokens=20, temperature=0))[0]
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == len(ids)


def test_continue_final_message_continues_the_assistant_turn(oai, model, offline):
    """vLLM's continue_final_message: the last (assistant) message is left open and the
    output continues it, exactly as the template's open rendering completed offline."""
    prefill = CHAT + [{"role": "assistant", "content": "Sure. The answer is"}]
    got = oai.chat.completions.create(model=model, messages=prefill, max_completion_tokens=12,
                                      temperature=0, extra_body={"continue_final_message": True,
                                                                 "add_generation_prompt": False})
    text = offline.tokenizer.apply_chat_template(prefill, add_generation_prompt=False,
                                                 continue_final_message=True)
    assert text.endswith("The answer is")  # open: no end-of-turn after it
    ids = offline.tokenizer.encode(text, add_special_tokens=False)
    assert got.choices[0].message.content == offline(
        ids, SamplingParams(max_tokens=12, temperature=0))[0]
    assert got.usage.prompt_tokens == len(ids)
    for extra, why in (({"continue_final_message": True}, "add_generation_prompt false"),
                       ({"continue_final_message": True, "add_generation_prompt": False},
                        "the assistant's")):
        with pytest.raises(openai.BadRequestError, match=why):
            oai.chat.completions.create(model=model, max_tokens=2, extra_body=extra,
                                        messages=prefill if "add_generation_prompt" not in extra
                                        else CHAT)


def test_streaming_chat_equals_non_streaming(oai, model):
    full = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
    stream = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=16,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and finishes.count(None) == \
        len(finishes) - 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_continuous_usage_stats_count_every_chunk(oai, model, route):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the usage so far, ending
    at the final usage chunk's figures; the text is the same as without it."""
    args = dict(model=model, max_tokens=10, temperature=0, stream=True, extra_body={
        "ignore_eos": True})
    create = (lambda **kw: oai.chat.completions.create(messages=CHAT, **kw)) if route == "chat" \
        else (lambda **kw: oai.completions.create(prompt=PROMPT, **kw))

    def text(chunks):
        return "".join((c.choices[0].delta.content or "") if route == "chat" else c.choices[0].text
                       for c in chunks if c.choices)

    chunks = list(create(**args, stream_options={"include_usage": True,
                                                 "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 10 and counts[-2] == 10
    assert chunks[-1].choices == []
    assert text(chunks) == text(list(create(**args)))


@pytest.mark.parametrize("body, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"stream": True, "stream_options": {"include_usage": True, "usage_every": 2}},
     "stream_options.usage_every"),
])
def test_stream_options_that_would_change_nothing_are_refused(server, body, param):
    with server.client() as http:
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


async def test_async_streaming_completion(server, offline):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key)
    stream = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT,
                                             max_tokens=12, temperature=0, stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len(pieces) >= 2  # really streamed, not one blob
    assert "".join(pieces) == offline(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0]
    await client.close()


def test_n_samples(oai, model):
    got = oai.completions.create(model=model, prompt="Once upon a time", n=3, max_tokens=10,
                                 temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in got.choices) == [0, 1, 2]
    assert got.usage.completion_tokens == 30
    assert len({c.text for c in got.choices}) > 1  # distinct samples
    stream = oai.completions.create(model=model, prompt="Once upon a time", n=3, max_tokens=10,
                                    temperature=1.0, seed=7, stream=True,
                                    extra_body={"ignore_eos": True})
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in sorted(got.choices, key=lambda c: c.index)]


def test_stop_string(oai, model):
    full = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert "." in text
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                 stop=["."])
    assert got.choices[0].text == text.split(".")[0]
    assert got.choices[0].finish_reason == "stop"


def test_seed_reproducible(oai, model):
    def sample(seed: int) -> str:
        return oai.completions.create(model=model, prompt="My favourite animal is",
                                      max_tokens=20, temperature=1.5, seed=seed,
                                      extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    # any int64 is a seed, as OpenAI's API and vLLM take it
    negative = sample(-5)
    assert sample(-5) == negative and negative != sample(5)
    assert sample(-2 ** 63) == sample(-2 ** 63)


def test_null_fields_mean_their_defaults(server, oai, model):
    """OpenAI's nullable fields and vLLM's Optional ones: `"temperature": null` (as LangChain or
    LiteLLM send for "unset") is the default, not a 400; a null max_tokens still means no cap,
    and a null required field is still refused."""
    nulls = {"temperature": None, "top_p": None, "n": None, "presence_penalty": None,
             "frequency_penalty": None, "stream": None}

    def post(route: str, body: dict) -> httpx.Response:
        return httpx.post(server.url + route, headers=server.headers, timeout=60,
                          json={"model": model, **body})

    chat = {"messages": CHAT, "max_tokens": 8, "seed": 7}
    got = post("/v1/chat/completions", {**chat, **nulls, "logprobs": None})
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["message"]["content"] == post(
        "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    assert len(got.json()["choices"]) == 1 and got.json()["choices"][0]["logprobs"] is None
    done = post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "echo": None, **nulls})
    assert done.status_code == 200 and not done.json()["choices"][0]["text"].startswith(PROMPT)
    assert post("/v1/responses", {"input": "Hi", "max_output_tokens": 4,
                                  "temperature": None}).status_code == 200
    # the official client sends an explicit None as null
    sdk = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=8, seed=7,
                                      temperature=None, top_p=None, n=None, stream=None,
                                      presence_penalty=None, frequency_penalty=None)
    assert sdk.choices[0].message.content == got.json()["choices"][0]["message"]["content"]
    missing = post("/v1/completions", {"prompt": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_text_parts_are_joined_one_per_line(oai, model):
    """Several text parts of one message reach the model one per line (as vLLM joins them), not
    glued into one word."""
    def ask(content) -> tuple[str, int]:
        got = oai.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": content}])
        return got.choices[0].message.content, got.usage.prompt_tokens

    parts = [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]
    assert ask(parts) == ask("Name a colour.\nOne word.")


def test_completion_logprobs(oai, model):
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                 logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == got.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) == 3
        assert top[token] == logprob == max(top.values())  # greedy picks the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_logprobs_streaming(oai, model):
    stream = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         stream=True)
    entries = [e for c in stream if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes).decode() == e.token


def test_chat_logprob_bytes_join_into_the_reply(oai, model):
    """A token holding part of a character reads as U+FFFD, but its `bytes` are its own: the
    reply's tokens' bytes, joined, are the reply's UTF-8 (streamed and not). The old bytes (of
    the decoded text) would join into U+FFFDs."""
    ask = [{"role": "user", "content": "Translate to Japanese: good morning, my friend."}]
    args = dict(model=model, messages=ask, max_tokens=24, temperature=0, logprobs=True,
                top_logprobs=1)
    whole = oai.chat.completions.create(**args).choices[0]
    entries = whole.logprobs.content
    assert any("\ufffd" in e.token for e in entries)  # the prompt draws split characters
    joined, content = b"".join(bytes(e.bytes) for e in entries), whole.message.content.encode()
    # max_tokens may cut the last character: its first bytes are in the tokens, not the text
    assert joined.startswith(content) and len(joined) - len(content) < 4
    chunks = [c for c in oai.chat.completions.create(**args, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.bytes for e in streamed] == [e.bytes for e in entries]


def test_max_tokens_and_min_tokens(oai, model):
    got = oai.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=7,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 7 and got.choices[0].finish_reason == "length"
    got = oai.completions.create(model=model, prompt="Hi", max_tokens=9, temperature=0,
                                 extra_body={"min_tokens": 9})
    assert got.usage.completion_tokens == 9


def test_tokenize_detokenize(server, offline):
    with server.client() as http:
        tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
        assert tok["tokens"] == offline.tokenizer.encode(PROMPT)
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == \
            offline.tokenizer.decode(tok["tokens"])
        chat = http.post("/tokenize", json={"messages": CHAT}).json()
        assert chat["tokens"] == chat_ids(offline.tokenizer, CHAT)
        strs = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
        assert strs["token_strs"] == [offline.tokenizer.token_str(t) for t in tok["tokens"]]


def test_tokenize_counts_what_the_chat_route_feeds_the_model(server, oai, model):
    """A chat-shaped /tokenize renders tools and an open final message as the chat route does:
    its count is the chat request's usage.prompt_tokens."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    prefill = CHAT + [{"role": "assistant", "content": "The answer is"}]
    cases = [({"messages": CHAT, "tools": tools}, {"tools": tools}),
             ({"messages": prefill, "add_generation_prompt": False,
               "continue_final_message": True},
              {"extra_body": {"add_generation_prompt": False, "continue_final_message": True}})]
    with server.client() as http:
        plain = http.post("/tokenize", json={"messages": CHAT}).json()["count"]
        for body, chat_args in cases:
            counted = http.post("/tokenize", json=body).json()["count"]
            used = oai.chat.completions.create(
                model=model, messages=body["messages"], max_tokens=1,
                **chat_args).usage.prompt_tokens
            assert counted == used and counted != plain


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": "hi", "chat_template": "{{ x }}"}, "chat_template"),
    ("/tokenize", {"prompt": "hi", "foo": 1}, "foo"),
    ("/tokenize", {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("/tokenize", {"prompt": "hi", "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, "add_special_tokens"),
    ("/detokenize", {"tokens": [1, 2], "skip_special_tokens": False}, "skip_special_tokens"),
])
def test_tokenize_refuses_what_it_would_not_apply(server, route, body, param):
    """Never a silently dropped field: unknown ones and chat-only ones sent with a prompt are a
    400 naming them."""
    with server.client() as http:
        r = http.post(route, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic test-key"}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200
    for probe in ("/health", "/health/live", "/health/ready", "/metrics"):  # probes send HEAD
        head = httpx.head(server.url + probe)
        assert head.status_code == 200 and head.content == b""
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_openapi_describes_every_endpoint(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
                 "/detokenize", "/health", "/metrics", "/debug/kv"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ErrorResponse",
            "ChatCompletionResponse"} <= set(schemas)
