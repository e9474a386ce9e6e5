"""Server test fixtures: one shared `pagoda serve` process (API key on) for the session, and an
offline engine on the same weights for reference outputs."""

from __future__ import annotations

import pytest

from pagoda.sampling.params import SamplingParams
from tests.server.server_process import KV_CACHE_MEMORY, ServerProcess


@pytest.fixture(scope="session")
def server():
    proc = ServerProcess("--max-waiting", "512")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def offline(make_engine):
    """`offline(prompt_or_ids, params) -> text`: the engine run directly, no server."""
    engine = make_engine(kv_cache_memory=KV_CACHE_MEMORY)
    counter = iter(range(1_000_000))

    def generate(prompt: str | list[int], params: SamplingParams) -> list[str]:
        req_id = f"offline-{next(counter)}"
        engine.add_request(req_id, prompt, params)
        texts = [""] * params.n
        while engine.has_unfinished_requests():
            for out in engine.step():
                for o in out.outputs:
                    texts[o.index] += o.text
        return texts

    generate.tokenizer = engine.tokenizer
    return generate


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat messages as the server renders them (template text, no extra special tokens)."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
