"""`pagoda ray-serve` whose replicas are tensor-parallel engines of two ranks, the second placed
by Ray (`--distributed-executor ray`: a task in the Serve cluster, not a child of the replica).
Marked `soak` (`make soak`): four model loads on 2 cores before the first answer; the plain
replicas' routing, streaming and aborts are test_ray_serve.py's, Ray-placed ranks outside Serve
tests/parallel/test_ray_executor.py's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from tests.cluster.ray_harness import ray_serve

pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.fixture(scope="module")
def sharded_app():
    # each replica is rank 0 (half a CPU) and its second rank a Ray task in a placement group
    # (a CPU): three of Ray's logical CPUs for the two replicas
    with ray_serve("--num-replicas", "2", "--tensor-parallel-size", "2",
                   "--distributed-executor", "ray", "--ray-num-cpus", "3",
                   "--ray-router", "prefix",
                   # the file's blocks as the fp32 product, which one fp32 process's greedy text
                   # is compared with (tests/parallel/test_tensor_parallel.py's tp_engine: why)
                   "--quant-kernel", "wgemm") as url:
        yield url


def test_sharded_replicas_give_one_process_greedy_text(sharded_app, make_engine, loaded_model):
    from pagoda.sampling.params import SamplingParams
    from tests.engine.helpers import run_to_completion

    # 16 prompts with different beginnings (so different owners under the prefix router): that
    # both replicas answer some has probability 1 - 2**-15
    prompts = [f"Fact {i}: the capital of France is" for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    one_process = run_to_completion(make_engine(), {
        p: (loaded_model.tokenizer.encode(p), greedy) for p in prompts})
    client = openai.OpenAI(base_url=sharded_app + "/v1", api_key="none", max_retries=0)

    def complete(prompt: str) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(
            model="m", prompt=prompt, max_tokens=8, temperature=0)
        return raw.parse().choices[0].text, raw.headers["x-pagoda-replica"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(complete, prompts))
    assert [text for text, _ in answers] == [
        loaded_model.tokenizer.decode(one_process[p]) for p in prompts]
    assert len({replica for _, replica in answers}) == 2
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if "ray::_run_rank" in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) == 2  # one Ray-placed rank per replica, in the Serve cluster
