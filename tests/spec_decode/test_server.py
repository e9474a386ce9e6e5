"""`pagoda serve --speculative-method draft|hybrid` end to end with the official openai client: the
greedy reply equals the server's reply with speculation opted out (a vLLM-style extra field),
streaming and not, concurrent requests included, and /metrics counts drafts and acceptances under
vLLM's names; `pagoda bench serve` reports them."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.server_process import ServerProcess, serving

QUOTE = ("Repeat this sentence twice: the lantern by the harbour burns all night for the "
         "fishing boats.")


@pytest.fixture(scope="module", params=["draft", "hybrid"])
def spec_server(request):
    # hybrid on the fp32 model: on the GGUF's own blocks its self-draft would cost what the
    # model costs, and the engine drafts by lookup alone (test_engine_behaviour.py)
    weights = ["--quantization", "none"] if request.param == "hybrid" else []
    with serving("--speculative-method", request.param, "--num-speculative-tokens", "3",
                 *weights) as proc:
        yield proc


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = [float(line.rpartition(" ")[2]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values)


def test_openai_client_same_tokens_with_and_without_speculation(spec_server):
    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key=spec_server.api_key,
                           max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": QUOTE}]

    def ask(speculative: bool, stream: bool = False) -> str:
        kw = dict(model=model, messages=messages, max_tokens=40, temperature=0,
                  extra_body={"speculative": speculative, "ignore_eos": True})
        if stream:
            chunks = client.chat.completions.create(stream=True, **kw)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(**kw)
        assert reply.usage.completion_tokens == 40
        return reply.choices[0].message.content

    drafted_before = metric(spec_server, "pagoda:spec_decode_num_draft_tokens_total")
    plain = ask(False)
    assert metric(spec_server, "pagoda:spec_decode_num_draft_tokens_total") == drafted_before
    assert ask(True) == plain
    assert ask(True, stream=True) == plain
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: ask(True), range(4))) == [plain] * 4
    drafted = metric(spec_server, "pagoda:spec_decode_num_draft_tokens_total")
    accepted = metric(spec_server, "pagoda:spec_decode_num_accepted_tokens_total")
    per_pos = metric(spec_server, "pagoda:spec_decode_num_accepted_tokens_per_pos_total")
    assert drafted > drafted_before and 0 < accepted <= drafted
    assert per_pos == accepted


def test_bench_serve_reports_acceptance(spec_server):
    out = subprocess.run(
        [sys.executable, "-m", "pagoda.cli.main", "bench", "serve", "--base-url", spec_server.url,
         "--api-key", spec_server.api_key, "--num-prompts", "3", "--input-len", "16",
         "--output-len", "16", "--disable-tqdm"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Speculative Decoding" in out.stdout
    assert "Acceptance rate" in out.stdout
