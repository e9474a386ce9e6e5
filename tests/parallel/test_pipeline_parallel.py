"""Pipeline parallelism through the real engine: stage processes, hidden states over gloo,
one scheduler batch in flight per stage, each stage's own KV cache.

Every batch holds whole requests and each stage runs the same kernels one process would,
so the contract is the single-process one, token for token: transformers' greedy tokens in fp32
(with chunked prefill, prefix-cache hits, preemption and drafts), and quantized output
identical to one process. Gemma 3's stages: tests/engine/test_gemma3.py."""

from __future__ import annotations

import psutil
import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from tests.engine.test_hf_reference import GREEDY
from tests.parallel.test_tensor_parallel import (
    assert_a_dead_rank_fails_the_step,
    assert_reference_tokens,
    assert_staggered_then_cached,
    greedy_outputs,
    one_process_quantized,
    prompt_logprobs,
    tp_engine,
)


@pytest.fixture(scope="module")
def pp2():
    """The module's PP=2 engine (a start of its ranks is most of a test's time). Its last user,
    test_a_dead_stage_fails_the_step_instead_of_hanging, kills its stage 1 and closes it."""
    engine = tp_engine(pipeline_parallel_size=2, max_num_batched_tokens=64)
    yield engine
    engine.close()


def test_stage_0_counts_the_lm_head_as_layers(pp2):
    """SmolLM2's LM head is 8 layers' worth of weights: (30 + 8) / 2 - 8 = 11 layers on stage
    0, beside the head; 19 on stage 1."""
    assert pp2.peers.stage == range(0, 11)
    assert len(pp2.loaded.model.layers) == 11 and len(pp2.runner.kv_stores) == 11
    assert len(pp2.peers.workers) == 1 and pp2.peers.workers[0].process.poll() is None


def test_greedy_equals_transformers_in_a_staggered_batch(pp2, prompt_ids, reference):
    """Chunked prefill (64-token budget) beside decodes, batches in flight, then from
    the prefix cache."""
    assert_staggered_then_cached(pp2, prompt_ids, reference)


def assert_two_batches_in_flight(engine: LLMEngine, prompt_ids, reference) -> None:
    """With 4 requests the engine keeps two disjoint batches of 2 in the ring (watched at each
    submit); the tokens stay transformers' (the same computation as one batch after another)."""
    assert engine.runner.depth == 2
    seen = []
    submit = engine.runner.submit

    def watch(sched):
        seen.append([[r.req_id for r in s.scheduled] for s, _ in engine.in_flight]
                    + [[r.req_id for r in sched.scheduled]])
        return submit(sched)

    engine.runner.submit = watch
    try:
        assert_reference_tokens(engine, prompt_ids[:4], reference, "two batches in flight")
    finally:
        del engine.runner.submit
    pairs = [batches for batches in seen if len(batches) == 2]
    assert len(pairs) > len(seen) // 2, seen
    for a, b in pairs:
        assert len(a) == len(b) == 2 and not set(a) & set(b)


def test_two_batches_are_in_flight_at_once_and_their_tokens_are_transformers(pp2, prompt_ids,
                                                                            reference):
    assert_two_batches_in_flight(pp2, prompt_ids, reference)


def test_tensor_parallel_stages_keep_batches_in_flight_too(prompt_ids, reference):
    """TP=2 x PP=2 on one machine: stage 0's second rank starts each batch with rank 0 and
    finishes it on rank 0's `collect` (the vocabulary-parallel LM head's collective)."""
    engine = tp_engine(tensor_parallel_size=2, pipeline_parallel_size=2, num_threads=2,
                       max_num_batched_tokens=64)
    try:
        assert_two_batches_in_flight(engine, prompt_ids, reference)
        engine.check_integrity()
    finally:
        engine.close()


def test_a_request_aborted_while_in_flight_ends_and_the_others_are_unchanged(
        pp2, prompt_ids, reference):
    for i, ids in enumerate(prompt_ids[:4]):
        pp2.add_request(f"r{i}", ids, GREEDY)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    for _ in range(6):
        for out in pp2.step():
            tokens[out.req_id] += out.outputs[0].token_ids
    victim = next(r.req_id for r in pp2.in_flight[0][0].scheduled)
    pp2.abort_request(victim)
    while pp2.has_unfinished_requests():
        for out in pp2.step():
            tokens[out.req_id] += out.outputs[0].token_ids
    pp2.check_integrity()
    assert pp2.kv_manager.usage == 0 and not pp2.in_flight
    for i in range(4):
        if f"r{i}" != victim:
            assert tokens[f"r{i}"] == reference[i]
    assert tokens[victim] == reference[int(victim[1:])][:len(tokens[victim])]


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


@pytest.mark.parametrize("quantization", ["int8", "gguf"])
def test_quantized_stages_decode_what_one_process_decodes(quantization, loaded_model,
                                                          computed_once, prompt_ids):
    """GGUF blocks are found by layer number, so each stage quantizes before it is cut. One
    process's tokens: one_process_quantized (shared with test_tensor_parallel.py's reference)."""
    one = one_process_quantized(computed_once, quantization, loaded_model, prompt_ids)
    engine = tp_engine(pipeline_parallel_size=2, quantization=quantization,
                       quant_kernel="auto", kv_cache_dtype="auto")
    try:
        staged = greedy_outputs(engine, prompt_ids[2:6])
    finally:
        engine.close()
    assert staged == one["greedy"]


def test_a_dead_stage_fails_the_step_instead_of_hanging(pp2, prompt_ids):
    """On the module's engine, after its other tests (this one leaves it closed)."""
    worker = psutil.Process(pp2.peers.workers[0].process.pid)
    assert_a_dead_rank_fails_the_step(pp2, worker, prompt_ids[0])


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
