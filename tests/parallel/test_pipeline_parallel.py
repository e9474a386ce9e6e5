"""Pipeline parallelism through the real engine: stage processes, hidden states over gloo,
micro-batches, each stage's own KV cache.

Every micro-batch holds whole requests and each stage runs the same kernels one process would,
so the contract is the single-process one, token for token: transformers' greedy tokens in fp32
(with chunked prefill, prefix-cache hits, preemption and drafts), and quantized output
identical to one process. Gemma 3's stages: tests/engine/test_gemma3.py."""

from __future__ import annotations

import psutil
import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.parallel.test_tensor_parallel import (
    assert_a_dead_rank_fails_the_step,
    assert_reference_tokens,
    assert_staggered_then_cached,
    prompt_logprobs,
    tp_engine,
)


@pytest.fixture(scope="module")
def pp2():
    engine = tp_engine(pipeline_parallel_size=2, max_num_batched_tokens=64)
    yield engine
    engine.close()


def test_two_stages_hold_half_the_layers_each(pp2):
    assert pp2.peers.stage == range(0, 15)
    assert len(pp2.loaded.model.layers) == 15 and len(pp2.runner.kv_stores) == 15
    assert len(pp2.peers.workers) == 1 and pp2.peers.workers[0].process.poll() is None


def test_greedy_equals_transformers_in_a_staggered_batch(pp2, prompt_ids, reference):
    """Chunked prefill (64-token budget) beside decodes, split into micro-batches, then from
    the prefix cache."""
    assert_staggered_then_cached(pp2, prompt_ids, reference)


def test_log_probs_match_one_process(pp2, make_engine, prompt_ids):
    ids = [t for p in prompt_ids for t in p]  # one long prompt: several prefill chunks
    ours = prompt_logprobs(pp2, ids)
    single = prompt_logprobs(make_engine(max_num_batched_tokens=64), ids)
    assert max(abs(a - b) for a, b in zip(ours, single, strict=True)) <= 1e-4


def test_three_stages_under_preemption_with_drafts(prompt_ids, reference):
    """Three stages of 10 layers and a KV budget too small for the batch: requests are
    preempted and recomputed; the self-draft runs on rank 0, its verification rows go through
    every stage."""
    engine = tp_engine(pipeline_parallel_size=3, kv_cache_memory=8 << 20,
                       enable_prefix_caching=False, speculative_method="draft")
    try:
        assert_reference_tokens(engine, prompt_ids[:5], reference, "under preemption")
        assert engine.scheduler.num_preemptions > 0
        assert engine.stats().spec_num_accepted_tokens > 0
    finally:
        engine.close()


def greedy_outputs(engine: LLMEngine, prompt_ids: list[list[int]], max_tokens: int = 24
                   ) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return run_to_completion(engine, {f"r{i}": (ids, params) for i, ids in enumerate(prompt_ids)},
                             {f"r{i}": i for i in range(len(prompt_ids))})


@pytest.mark.parametrize("quantization", ["int8", "gguf"])
def test_quantized_stages_decode_what_one_process_decodes(quantization, prompt_ids):
    """GGUF blocks are found by layer number, so each stage quantizes before it is cut."""
    outputs = {}
    for pp in (1, 2):
        engine = tp_engine(pipeline_parallel_size=pp, quantization=quantization,
                           quant_kernel="auto", kv_cache_dtype="auto")
        try:
            outputs[pp] = greedy_outputs(engine, prompt_ids[2:6])
        finally:
            engine.close()
    assert outputs[2] == outputs[1]


def test_a_dead_stage_fails_the_step_instead_of_hanging(prompt_ids):
    engine = tp_engine(pipeline_parallel_size=2)
    worker = psutil.Process(engine.peers.workers[0].process.pid)
    assert_a_dead_rank_fails_the_step(engine, worker, prompt_ids[0])


@pytest.mark.parametrize("overrides,message", [
    ({"pipeline_parallel_size": 31}, "exceeds .* 30 layers"),
    ({"pipeline_parallel_size": 2, "tensor_parallel_size": 4}, "does not fit .* 3 KV heads"),
])
def test_what_cannot_be_staged_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tp_engine(**overrides)


def test_a_shared_loaded_model_is_not_cut(make_engine):
    with pytest.raises(ValueError, match="not a loaded"):
        make_engine(pipeline_parallel_size=2)


def test_embedding_models_are_refused():
    from pagoda.engine.embedding_engine import EmbeddingEngine

    with pytest.raises(ValueError, match="pipeline parallelism are for generation"):
        EmbeddingEngine(EngineConfig(task="embed", pipeline_parallel_size=2,
                                     progress=False))
