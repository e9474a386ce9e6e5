"""Server test fixtures: the `openai` client on `server` (the session's shared `pagoda serve`,
tests/conftest.py), and an offline engine on the same weights and kernels (the default: the
GGUF's blocks through igemm) for reference outputs.

`test_engine_process.py` overrides `server` with an `--engine-process` server and re-runs some
tests, comparing against `thread_server`."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

from pagoda.sampling.params import SamplingParams
from tests.server.server_process import KV_CACHE_MEMORY


@pytest.fixture(scope="module")
def oai(server):
    """The official `openai` client against `server` (whichever server the module uses)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


@pytest.fixture(scope="session")
def offline(default_model):
    """`offline(prompts, params) -> texts`: the engine run directly, no server.

    `prompts` is one prompt (text or ids; returns its n sample texts) or a list of text prompts
    run as one batch (returns the first sample text of each)."""
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_memory=KV_CACHE_MEMORY, progress=False),
                       loaded=default_model)
    counter = iter(range(1_000_000))
    # Stepped in a worker thread, as the server does: on a loaded 2-core box torch's intra-op
    # pool is many times slower when driven from the main thread.
    worker = concurrent.futures.ThreadPoolExecutor(1)

    def generate(prompts: str | list[int] | list[str], params: SamplingParams) -> list[str]:
        return worker.submit(run, prompts, params).result()

    def run(prompts: str | list[int] | list[str], params: SamplingParams) -> list[str]:
        batch = isinstance(prompts, list) and prompts and isinstance(prompts[0], str)
        req_ids = []
        for prompt in (prompts if batch else [prompts]):
            req_ids.append(f"offline-{next(counter)}")
            engine.add_request(req_ids[-1], prompt, params)
        texts = {r: [""] * params.n for r in req_ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                for o in out.outputs:
                    texts[out.req_id][o.index] += o.text
        return [texts[r][0] for r in req_ids] if batch else texts[req_ids[0]]

    def score(ids: list[int]) -> list:
        """The prompt's log-probs (one {token: logprob} per token, None first)."""
        def run_scoring():
            req_id = f"offline-{next(counter)}"
            engine.add_request(req_id, ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
            last = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    last = out if out.req_id == req_id else last
            return last.prompt_logprobs

        return worker.submit(run_scoring).result()

    generate.tokenizer = engine.tokenizer
    generate.score = score
    yield generate
    worker.shutdown()


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat messages as the server renders them (template text, no extra special tokens)."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
