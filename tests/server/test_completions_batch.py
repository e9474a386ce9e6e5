"""Several prompts per completions request, echo with prompt log-probs (what
lm-evaluation-harness sends), vLLM's prompt_logprobs, and the tokenizer/version routes."""

from __future__ import annotations

import pytest

from pagoda.sampling.params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def test_each_prompt_of_a_batch_equals_it_alone(oai, offline):
    r = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS, max_tokens=10,
                               temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    want = [offline(p, SamplingParams(max_tokens=10, temperature=0))[0] for p in PROMPTS]
    assert [c.text for c in r.choices] == [w for w in want for _ in range(2)]
    alone = [oai.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=10,
                                    temperature=0) for p in PROMPTS]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)


def test_token_id_batches_stream_with_the_same_indices(oai, offline):
    tok = offline.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    texts = {}
    for chunk in oai.completions.create(model="SmolLM2-135M-Instruct", prompt=ids,
                                        max_tokens=8, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    want = [offline(i, SamplingParams(max_tokens=8, temperature=0))[0] for i in ids]
    assert [texts[i] for i in range(3)] == want


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt(oai, offline, max_tokens):
    """lm-eval's loglikelihood request: token ids, echo, logprobs=1, max_tokens 0 or 1."""
    tok = offline.tokenizer
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    r = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, echo=True,
                               logprobs=1, max_tokens=max_tokens, temperature=0)
    for prompt_ids, choice in zip(ids, r.choices, strict=True):
        lp = choice.logprobs
        assert choice.text.startswith(tok.decode(prompt_ids, skip_special_tokens=False))
        assert len(lp.tokens) == len(prompt_ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
        if max_tokens == 0:
            assert choice.text == tok.decode(prompt_ids, skip_special_tokens=False)
    if max_tokens == 0:
        assert r.usage.completion_tokens == 0


def test_a_streamed_scoring_request_generates_no_tokens(oai):
    """max_tokens 0 with echo runs one token internally: usage counts none, as unstreamed."""
    kw = dict(model="SmolLM2-135M-Instruct", prompt=PROMPTS[:2], echo=True, max_tokens=0)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True},
                                         **kw))
    whole = oai.completions.create(**kw)
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert chunks[-1].usage.completion_tokens == 0


def test_echo_streams_the_prompt_first(oai):
    pieces = [c.choices[0].text for c in oai.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], echo=True, max_tokens=4,
        temperature=0, stream=True) if c.choices]
    assert pieces[0].startswith(PROMPTS[0])


def test_vllm_prompt_logprobs_on_completions_and_chat(server):
    with server.client() as http:
        r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 1,
                                                "prompt_logprobs": 2}).json()
        lps = r["choices"][0]["prompt_logprobs"]
        assert lps[0] is None and all(len(e) >= 2 for e in lps[1:])
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for e in lps[1:]
                   for v in e.values())
        chat = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "prompt_logprobs": 0}).json()
        assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == \
            chat["usage"]["prompt_tokens"]


def test_bad_batches_are_400(server):
    with server.client() as http:
        for body in ({"prompt": ["a", ""]}, {"prompt": [[1, 2], []]},
                     {"prompt": ["x"] * 1025}, {"prompt": [[10 ** 7]]}):
            r = http.post("/v1/completions", json={**body, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code \
            == 200
