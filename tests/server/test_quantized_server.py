"""`pagoda serve --quantization M` for every mode: the official openai client, plain and
streaming, against a real server whose linears are quantized (int8 / int4 / the GGUF's blocks).

Each mode's accuracy against fp32 is tested offline (tests/quant/test_real_model_modes.py); here
the point is that the whole serving path runs with it: loading, kernel packing, prefill (GEMM)
and decode (GEMV) rows, streaming, and the metrics.

The servers run with prefix caching on: the repeated prompt's last token is then computed alone
(a decode-sized call) while the first request computed it inside the prefill, and a request's
greedy tokens must not depend on that, nor on the other requests of its batch (qgemm computes a
row the same way in any batch).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.server_process import ServerProcess

MODES = ["int8", "int4", "gguf"]


@pytest.fixture(scope="module", params=MODES)
def quantized_server(request):
    if request.param == "gguf":  # the default: the session's shared server runs the file's blocks
        yield request.param, request.getfixturevalue("thread_server")
        return
    proc = ServerProcess("--quantization", request.param)
    try:
        proc.wait_ready()
        yield request.param, proc
    finally:
        proc.stop()


def test_chat_and_streaming_with_each_quantization(quantized_server):
    mode, server = quantized_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name three primary colors."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.choices[0].message.content.strip()
    assert 0 < reply.usage.completion_tokens <= 12

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # Same greedy tokens whether streamed or not (both decode through the same kernels).
    assert text == reply.choices[0].message.content, mode

    generated = [line for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines()
                 if line.startswith("pagoda:generation_tokens_total")]
    assert generated and float(generated[0].rpartition(" ")[2]) >= 2 * reply.usage.completion_tokens


def _metric(server: ServerProcess, name: str) -> float:
    lines = [line for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines()
             if line.startswith(name)]
    return float(lines[0].rpartition(" ")[2]) if lines else 0.0


def test_greedy_tokens_do_not_depend_on_the_batch_or_the_prefix_cache(quantized_server):
    mode, server = quantized_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    model = client.models.list().data[0].id

    def complete(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                          temperature=0).choices[0].text

    # longer than two KV blocks of 16 tokens, so the repeat finds whole blocks in the cache
    prompt = ("Geography notes. France has Paris, Lyon and Marseille. Germany has Berlin, "
              "Hamburg and Munich. Spain has Madrid, Barcelona and Valencia. The three largest "
              "cities of Italy are Rome, Milan and")
    alone = complete(prompt)
    hits = _metric(server, "pagoda:prefix_cache_hits")
    others = [f"Write a short note about the number {i}:" for i in range(5)]
    with ThreadPoolExecutor(6) as pool:  # the same prompt again, amid five others
        texts = list(pool.map(complete, [*others[:3], prompt, *others[3:]]))
    assert texts[3] == alone, mode
    assert _metric(server, "pagoda:prefix_cache_hits") > hits, "the repeat should hit the cache"
