"""`pagoda serve --quantization M` for every mode: the official openai client, plain and
streaming, against a real server whose linears are quantized (int8 / int4 / the GGUF's blocks).

Each mode's accuracy against fp32 is tested offline (tests/quant/test_real_model_modes.py); here
the point is that the whole serving path runs with it: loading, kernel packing, prefill (GEMM)
and decode (GEMV) rows, streaming, and the metrics.

The servers run without prefix caching so that both requests compute the prompt in one prefill.
With it, the repeated prompt's last token is computed alone, i.e. by the decode GEMV; for int4
and gguf that reads the exact 4-bit groups while the prefill GEMM multiplies their per-row int8
re-rounding, and the greedy continuation can differ (measured: it did, for both).
docs/quantization.md lists this under known gaps.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.server_process import ServerProcess

MODES = ["int8", "int4", "gguf"]


@pytest.fixture(scope="module", params=MODES)
def quantized_server(request):
    proc = ServerProcess("--quantization", request.param, "--no-prefix-caching")
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
