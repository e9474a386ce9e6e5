"""`pagoda ray-serve` with two replicas on a local Ray instance, each a tensor-parallel engine of
two ranks whose second rank Ray places (`--distributed-executor ray`: a task in the Serve
cluster, not a child of the replica): the `openai` client (JSON and SSE) is answered by both
with one process's greedy text, and the Pagoda gateway takes the Ray endpoint as an upstream.
Autoscaling and a replica SIGKILLed under load: test_ray_serve_faults.py (`make soak`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from tests.cluster.ray_harness import ray_serve
from tests.gateway.gateway_harness import KEY_ALICE, GatewayServer, make_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_app():
    # scale-out of sharded engines: each replica is rank 0 (half a CPU) and its second rank a
    # Ray task in a placement group (a CPU): three of Ray's logical CPUs for the two replicas
    with ray_serve("--num-replicas", "2", "--tensor-parallel-size", "2",
                   "--distributed-executor", "ray", "--ray-num-cpus", "3") as url:
        yield url


def test_both_replicas_answer_the_openai_client(ray_app):
    client = openai.OpenAI(base_url=ray_app + "/v1", api_key="none", max_retries=0)

    def chat(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": f"Hi {i}"}],
            max_tokens=16, temperature=0)
        assert raw.parse().choices[0].message.content
        return raw.headers["x-pagoda-replica"]

    # Ray's router picks by queue length and may keep a round on one replica while the other
    # warms up: a few rounds, each answered in full, until both have answered
    replicas: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for round_ in range(4):
            replicas |= set(pool.map(chat, range(16 * round_, 16 * round_ + 16)))
            if len(replicas) == 2:
                break
    assert len(replicas) == 2
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    # the Pagoda gateway takes the Ray Serve endpoint as an upstream (keys, limits, cache stay
    # in the gateway; Ray balances behind it)
    with GatewayServer(make_config({"m": [ray_app]}, cache={"enabled": False})) as gw:
        via = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_ALICE, max_retries=0)
        raw = via.completions.with_raw_response.create(model="m", prompt="Hello", max_tokens=3)
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].text
    assert raw.headers["x-pagoda-upstream"] == ray_app[len("http://"):]


def test_sharded_replicas_give_one_process_greedy_text(ray_app, make_engine, loaded_model):
    from pagoda.sampling.params import SamplingParams
    from tests.engine.helpers import run_to_completion

    prompt = "The capital of France is"
    expected = loaded_model.tokenizer.decode(run_to_completion(make_engine(), {"r": (
        loaded_model.tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=8))})["r"])
    client = openai.OpenAI(base_url=ray_app + "/v1", api_key="none", max_retries=0)
    with ThreadPoolExecutor(4) as pool:  # several at once, so both replicas are likely asked
        texts = list(pool.map(lambda _: client.completions.create(
            model="m", prompt=prompt, max_tokens=8, temperature=0).choices[0].text, range(4)))
    assert texts == [expected] * 4
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if "ray::_run_rank" in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) == 2  # one Ray-placed rank per replica, in the Serve cluster
