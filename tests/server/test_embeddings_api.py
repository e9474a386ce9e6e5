"""/v1/embeddings end to end: a real `pagoda serve --model all-MiniLM-L6-v2`, the official
`openai` client (float and base64), LangChain's OpenAIEmbeddings, bad input, and the reference
vectors of sentence-transformers."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import numpy as np
import openai
import pytest

from tests.embeddings.conftest import MINILM
from tests.embeddings.texts import LONG, TEXTS
from tests.server.server_process import serving

MIN_COSINE = 0.9999
TRUNCATE = {"truncate_prompt_tokens": -1}  # what sentence-transformers does to long inputs

PAIRS = [  # (sentence, paraphrase) for the retrieval check
    ("The cat sat on the mat.", "A cat was sitting on the rug."),
    ("How do I bake bread at home?", "What is a recipe for homemade bread?"),
    ("The meeting was moved to Friday.", "We rescheduled the meeting for Friday."),
    ("Python is a popular programming language.", "Many developers like coding in Python."),
    ("It is raining heavily outside.", "There is a downpour outdoors right now."),
    ("She won the chess tournament.", "The chess championship was won by her."),
    ("The train to Berlin is delayed.", "Our Berlin train is running late."),
    ("I need to renew my passport.", "My passport has to be renewed."),
    ("The restaurant serves excellent sushi.", "That place has great sushi."),
    ("Global temperatures keep rising.", "The planet is getting warmer every year."),
    ("He broke his leg while skiing.", "Skiing, he fractured his leg."),
    ("The library closes at 8 pm.", "At eight in the evening the library shuts."),
    ("Turn off the lights when you leave.", "Switch the lights off as you go out."),
    ("The company reported record profits.", "Earnings at the firm hit an all-time high."),
    ("My laptop battery drains quickly.", "The battery on my notebook runs out fast."),
    ("The concert tickets sold out in minutes.", "Tickets for the show were gone almost "
                                                 "instantly."),
    ("Drink plenty of water in hot weather.", "Stay hydrated when it is hot."),
    ("The bridge was closed for repairs.", "Repairs shut down the bridge."),
    ("Their flight landed safely in Tokyo.", "The plane touched down in Tokyo without "
                                             "trouble."),
    ("Add salt to the boiling pasta water.", "Put some salt into the water for the pasta."),
]


@pytest.fixture(scope="module")
def embed_server():
    with serving("--model", MINILM) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(embed_server):
    return openai.OpenAI(base_url=embed_server.url + "/v1", api_key=embed_server.api_key,
                         max_retries=0)


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.asarray([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                       if isinstance(d.embedding, str) else d.embedding for d in response.data])


# not given: the client asks for base64 itself and decodes it; given, it hands back the strings
@pytest.mark.parametrize("encoding_format", [openai.NOT_GIVEN, "float", "base64"])
def test_openai_client_matches_sentence_transformers(client, sentence_transformer,
                                                     encoding_format):
    r = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format=encoding_format,
                                 extra_body=TRUNCATE)
    assert isinstance(r.data[0].embedding, str) == (encoding_format == "base64")
    ref = sentence_transformer.encode(TEXTS)
    assert r.model == MINILM and r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)
    assert cosines(vectors(r), ref).min() >= MIN_COSINE


@pytest.mark.parametrize("text", ["hello there", "general"])
def test_base64_and_float_are_the_same_numbers(embed_server, text):
    # One input per request: the inputs of one request are separate engine requests, packed into
    # one step or into two depending on when each arrives, and a GEMM over 7 packed rows rounds
    # its sums in another order than one over 4 (the vectors then differ in the 7th digit). Alone
    # in its step, an input is computed the same way both times, so the encodings must agree bit
    # for bit.
    def post(fmt):
        r = httpx.post(embed_server.url + "/v1/embeddings", headers=embed_server.headers,
                       json={"input": text, "encoding_format": fmt})
        assert r.status_code == 200, r.text
        return [d["embedding"] for d in r.json()["data"]]

    decoded = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in post("base64")]
    assert np.array_equal(np.asarray(decoded), np.asarray(post("float"), dtype=np.float32))


def test_token_ids_embed_like_their_text(client, embed_server):
    ids = httpx.post(embed_server.url + "/tokenize", headers=embed_server.headers,
                     json={"prompt": TEXTS[2]}).json()["tokens"]
    by_text = vectors(client.embeddings.create(model=MINILM, input=TEXTS[2]))
    by_ids = vectors(client.embeddings.create(model=MINILM, input=ids))
    by_lists = vectors(client.embeddings.create(model=MINILM, input=[ids, ids[:3]]))
    assert cosines(by_text, by_ids)[0] >= 0.999999 and cosines(by_ids, by_lists[:1])[0] >= 0.999999


def test_langchain_openai_embeddings(embed_server, sentence_transformer):
    from langchain_openai import OpenAIEmbeddings

    # LangChain tokenizes with tiktoken (OpenAI's vocabulary) unless told to send the text
    lc = OpenAIEmbeddings(model=MINILM, base_url=embed_server.url + "/v1",
                          api_key=embed_server.api_key, check_embedding_ctx_length=False)
    docs = lc.embed_documents(TEXTS[:6])
    query = lc.embed_query(TEXTS[3])
    ref = sentence_transformer.encode(TEXTS[:6])
    assert cosines(docs, ref).min() >= MIN_COSINE
    assert cosines([query], ref[3:4])[0] >= MIN_COSINE


def test_a_paraphrase_finds_its_sentence(client):
    originals = vectors(client.embeddings.create(model=MINILM, input=[p[0] for p in PAIRS]))
    queries = vectors(client.embeddings.create(model=MINILM, input=[p[1] for p in PAIRS]))
    nearest = (queries @ originals.T).argmax(1)
    assert list(nearest) == list(range(len(PAIRS)))


def test_concurrent_small_requests_equal_one_batched_request(client):
    batched = vectors(client.embeddings.create(model=MINILM, input=TEXTS[:24]))
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        alone = list(pool.map(
            lambda t: vectors(client.embeddings.create(model=MINILM, input=t))[0], TEXTS[:24]))
    assert cosines(alone, batched).min() >= 0.999999


BAD = [
    ({"input": []}, "input"), ({"input": ""}, "input"), ({"input": ["ok", ""]}, "input"),
    ({"input": [[]]}, "input"), ({"input": [1, "a"]}, "input"), ({"input": True}, "input"),
    ({"input": None}, "input"), ({"input": {"text": "a"}}, "input"), ({}, "input"),
    ({"input": [-1]}, "input"), ({"input": [30522]}, "input"), ({"input": [[1.5]]}, "input"),
    ({"input": LONG}, "input"), ({"input": ["x"] * 10_000}, "input"),
    ({"input": "a", "dimensions": 128}, "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "truncate_prompt_tokens": 10_000}, "truncate_prompt_tokens"),
    ({"input": "a", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"input": "a", "model": "gpt-4"}, "model"), ({"input": "a", "made_up": 1}, "made_up"),
    ('{"input": "a\\ud800"}', "input"),  # raw JSON: a lone surrogate, escaped
]


@pytest.mark.parametrize("body, param", BAD)
def test_bad_input_is_a_400_naming_the_field(embed_server, body, param):
    with httpx.Client(base_url=embed_server.url, headers=embed_server.headers) as http:
        r = http.post("/v1/embeddings", content=body, headers={
            "content-type": "application/json"}) if isinstance(body, str) else \
            http.post("/v1/embeddings", json=body)
        expected = 404 if param == "model" else 400
        assert r.status_code == expected, r.text
        error = r.json()["error"]
        assert error["param"].split(".")[0] == param and error["message"]
        ok = http.post("/v1/embeddings", json={"input": "still fine"})  # same connection
        assert ok.status_code == 200


def test_long_input_error_names_its_index_and_truncation_cuts_it(client):
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] has \d+ tokens"):
        client.embeddings.create(model=MINILM, input=["short", LONG])
    r = client.embeddings.create(model=MINILM, input=["short", LONG],
                                 extra_body={"truncate_prompt_tokens": 16})
    assert len(r.data) == 2


def test_generation_routes_refuse_an_embedding_model(embed_server, server):
    r = httpx.post(embed_server.url + "/v1/chat/completions", headers=embed_server.headers,
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/embeddings", headers=server.headers, json={"input": "hi"})
    assert r.status_code == 400 and "--task embed" in r.json()["error"]["message"]


def test_metrics_count_embedded_inputs(client, embed_server):
    def count() -> float:
        text = httpx.get(embed_server.url + "/metrics").text
        line = next(ln for ln in text.splitlines()
                    if ln.startswith("pagoda:embedding_inputs_total"))
        return float(line.rsplit(" ", 1)[1])

    before = count()
    client.embeddings.create(model=MINILM, input=TEXTS[:7])
    assert count() - before == 7
    assert httpx.get(embed_server.url + "/health").status_code == 200
