"""Tensor parallelism through the real engine: worker processes, gloo collectives, sharded KV.

fp32 is held to the single-process contract (transformers' greedy tokens, log-probs within
1e-4: only the all-reduce's summation order differs) in a busy batch with chunked prefill,
prefix-cache hits and preemption. Quantized shards are compared by perplexity: their products
are the same per block, but a last-ulp difference in a sum can flip an activation's int8
rounding downstream (docs/parallel.md)."""

from __future__ import annotations

import math

import psutil
import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.engine.test_hf_reference import GREEDY, PROMPTS


def assert_reference_tokens(engine: LLMEngine, prompt_ids: list[list[int]],
                            reference: list[list[int]], what: str) -> None:
    """Run the prompts together; each must decode transformers' greedy tokens."""
    got = run_to_completion(engine, {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)})
    for i in range(len(prompt_ids)):
        assert got[f"r{i}"] == reference[i], f"prompt {i} differs {what}"
    engine.check_integrity()


def tp_engine(**overrides) -> LLMEngine:
    overrides.setdefault("kv_cache_memory", 64 << 20)
    # The file's blocks through wgemm compute the fp32 model's product, so the parallel engines
    # meet transformers' tokens and one fp32 process's logits up to reduction order. The default
    # kernel (igemm) rounds activations to int8, where an ulp of reduction order can flip a
    # rounding: its shards are held to one process's perplexity instead (the quantized tests).
    overrides.setdefault("quant_kernel", "wgemm")
    # and an fp32 cache, as the fp32 process keeps (quantized linears default to bf16)
    overrides.setdefault("kv_cache_dtype", "fp32")
    # its own weights: tensor parallelism cuts the loaded model to rank 0's share in place
    return LLMEngine(EngineConfig(progress=False, **overrides))


@pytest.fixture(scope="module")
def tp2():
    """The module's TP=2 engine (a start of its ranks is most of a test's time). Its last user,
    test_a_dead_rank_fails_the_step_instead_of_hanging, kills its rank 1 and closes it."""
    engine = tp_engine(tensor_parallel_size=2, max_num_batched_tokens=64)
    yield engine
    engine.close()


def test_two_ranks_split_three_kv_heads_unevenly(tp2):
    assert list(tp2.peers.shard.kv_heads) == [0, 1]
    attn = tp2.loaded.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (6, 2)
    assert len(tp2.peers.workers) == 1 and tp2.peers.workers[0].process.poll() is None


def assert_staggered_then_cached(engine: LLMEngine, prompt_ids: list[list[int]],
                                 reference: list[list[int]]) -> None:
    """Staggered arrivals (chunked prefill beside decodes), then the same batch again, now
    served from the prefix cache: transformers' greedy tokens both times."""
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)}
    arrivals = {f"r{i}": 3 * i for i in range(len(prompt_ids))}
    for _ in range(2):
        got = run_to_completion(engine, requests, arrivals)
        for i in range(len(prompt_ids)):
            assert got[f"r{i}"] == reference[i], f"prompt {i} ({PROMPTS[i][:30]!r}) differs"
        engine.check_integrity()
    assert engine.kv_manager.num_hit_tokens > 0


def test_greedy_equals_transformers_in_a_staggered_batch(tp2, prompt_ids, reference):
    """Chunked prefill (64-token budget) beside decodes, then from the prefix cache."""
    assert_staggered_then_cached(tp2, prompt_ids, reference)


def prompt_logprobs(engine: LLMEngine, ids: list[int]) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    engine.add_request("score", ids, params)
    scored = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            scored = out.prompt_logprobs or scored
    assert scored is not None
    return [entry[t] for entry, t in zip(scored[1:], ids[1:], strict=True)]


def test_log_probs_within_1e4_of_one_process(tp2, make_engine, prompt_ids):
    ids = [t for p in prompt_ids for t in p]  # one long prompt: several prefill chunks
    ours = prompt_logprobs(tp2, ids)
    single = prompt_logprobs(make_engine(), ids)
    assert max(abs(a - b) for a, b in zip(ours, single, strict=True)) <= 1e-4


def test_three_ranks_under_preemption(prompt_ids, reference):
    """One KV head per rank and a KV budget too small for the batch: requests are preempted and
    recomputed, and still decode transformers' tokens. Closing the engine stops its workers."""
    engine = tp_engine(tensor_parallel_size=3, kv_cache_memory=8 << 20,
                       enable_prefix_caching=False)
    workers = [w.process for w in engine.peers.workers]
    try:
        assert_reference_tokens(engine, prompt_ids[:5], reference, "under preemption")
        assert engine.scheduler.num_preemptions > 0
    finally:
        engine.close()
    assert [w.poll() for w in workers] == [0, 0]  # each exited, cleanly


def greedy_outputs(engine: LLMEngine, prompt_ids: list[list[int]], max_tokens: int = 24
                   ) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return run_to_completion(engine, {f"r{i}": (ids, params) for i, ids in enumerate(prompt_ids)},
                             {f"r{i}": i for i in range(len(prompt_ids))})


def perplexity_text_ids(loaded_model) -> list[int]:
    """~800 tokens of the packaged text: a few hundred prompt tokens let single rounding flips
    move the figure by over 1% (seen with the AVX2 kernels)."""
    from importlib.resources import files

    text = files("pagoda.data").joinpath("devils_dictionary.txt").read_text()[:4000]
    return loaded_model.tokenizer.encode(text)


def one_process_quantized(computed_once, quantization: str, loaded_model,
                          prompt_ids: list[list[int]]) -> dict:
    """One process's quantized engine, the reference of both parallel layouts: its prompt
    log-probs of `perplexity_text_ids` (this file) and its greedy tokens for prompts 2-5
    (test_pipeline_parallel.py). One engine computes both, once per run (`computed_once`)."""
    def compute() -> dict:
        engine = tp_engine(quantization=quantization, quant_kernel="auto", kv_cache_dtype="auto")
        return {"logprobs": prompt_logprobs(engine, perplexity_text_ids(loaded_model)),
                "greedy": greedy_outputs(engine, prompt_ids[2:6])}

    return computed_once(f"smollm2_{quantization}_one_process", compute)


@pytest.mark.parametrize("quantization", ["int8", "gguf"])
def test_quantized_shards_keep_the_perplexity(loaded_model, computed_once, prompt_ids,
                                              quantization):
    """int8 quantizes each rank's fp32 share; gguf cuts the file's own blocks (rows, and
    group-aligned columns of o_proj / down_proj). Over ~800 tokens (perplexity_text_ids)."""
    ids = perplexity_text_ids(loaded_model)
    one = one_process_quantized(computed_once, quantization, loaded_model, prompt_ids)
    engine = tp_engine(tensor_parallel_size=2, quantization=quantization, quant_kernel="auto",
                       kv_cache_dtype="auto")
    try:
        lps = {1: one["logprobs"], 2: prompt_logprobs(engine, ids)}
    finally:
        engine.close()
    perplexity = {tp: math.exp(-sum(lp) / len(lp)) for tp, lp in lps.items()}
    assert len(ids) > 600 and len(lps[1]) == len(lps[2]) == len(ids) - 1
    assert abs(perplexity[2] / perplexity[1] - 1) < 0.02, perplexity


def assert_a_dead_rank_fails_the_step(engine: LLMEngine, rank: psutil.Process,
                                      prompt_ids: list[int]) -> None:
    """Kill `rank` (a worker process of `engine`): the next steps raise instead of hanging;
    the engine is closed afterwards either way."""
    try:
        rank.kill()
        rank.wait(10)
        engine.add_request("r", prompt_ids, GREEDY)
        with pytest.raises(RuntimeError, match="rank 1|Connection|closed|reset"):
            for _ in range(5):
                engine.step()
    finally:
        engine.close()


def test_a_dead_rank_fails_the_step_instead_of_hanging(tp2, prompt_ids):
    """On the module's engine, after its other tests (this one leaves it closed)."""
    worker = psutil.Process(tp2.peers.workers[0].process.pid)
    assert_a_dead_rank_fails_the_step(tp2, worker, prompt_ids[0])


@pytest.mark.parametrize("overrides,message", [
    ({"tensor_parallel_size": 4}, "does not fit .* 3 KV heads"),
])
def test_what_cannot_be_split_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tp_engine(**overrides)


def test_speculative_drafts_are_verified_across_ranks(prompt_ids, reference):
    """The self-draft runs on rank 0 alone; its drafts' verification rows go to every rank."""
    engine = tp_engine(tensor_parallel_size=2, speculative_method="draft")
    try:
        assert_reference_tokens(engine, prompt_ids[:3], reference, "with drafts")
        assert engine.stats().spec_num_accepted_tokens > 0
    finally:
        engine.close()


def test_a_shared_loaded_model_is_not_cut(make_engine):
    with pytest.raises(ValueError, match="not a loaded"):
        make_engine(tensor_parallel_size=2)
