"""Prompt log-probabilities (lm-eval's loglikelihood) equal transformers' on the same weights,
with chunked prefill, a warm prefix cache, n > 1 and preemption."""

from __future__ import annotations

import math

import pytest

from pagoda.sampling.params import SamplingParams

PROMPTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
           "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
           "Once upon a time, in a land far away, there lived a curious little fox " * 6]


@pytest.fixture(scope="module")
def reference(hf_computed):
    """{prompt: (ids, [(next token's log-prob, top-3 ids)] from transformers)}."""
    return hf_computed["prompt_logprobs"]


def scored(engine, prompts, params):
    outs = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.req_id] = o
    return [outs[f"p{i}"] for i in range(len(prompts))]


def check(out, ids, ref, num_top):
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for i in range(1, len(ids)):
        entry = lps[i]
        logprob, top3 = ref[i - 1]
        assert abs(entry[ids[i]] - logprob) < 1e-4, i
        assert len(entry) in (num_top, num_top + 1)
        if num_top:
            assert set(top3[:num_top]) <= set(entry)


@pytest.mark.parametrize("overrides", [
    {}, {"max_num_batched_tokens": 16}, {"enable_prefix_caching": True}],
    ids=["plain", "chunked", "prefix-cache"])
def test_prompt_logprobs_equal_transformers(make_engine, reference, overrides):
    engine = make_engine(kv_cache_memory=64 << 20, **overrides)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, n=2)
    prompts = [reference[t][0] for t in PROMPTS]
    for _ in range(2):  # the second round finds every prompt in the prefix cache, if enabled
        for out, text in zip(scored(engine, prompts, params), PROMPTS, strict=True):
            ids, ref = reference[text]
            check(out, ids, ref, 3)
            assert all(math.isfinite(v) for e in out.prompt_logprobs[1:] for v in e.values())
    engine.check_integrity()


def test_prompt_logprobs_survive_preemption(make_engine, reference):
    engine = make_engine(kv_cache_memory=12 * 16 * 46080, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, prompt_logprobs=0)
    prompts = [reference[t][0] for t in PROMPTS]
    outs = scored(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for out, text in zip(outs, PROMPTS, strict=True):
        ids, ref = reference[text]
        check(out, ids, ref, 0)


def test_without_prompt_logprobs_there_are_none(make_engine):
    engine = make_engine(kv_cache_memory=64 << 20)
    [out] = scored(engine, ["Hello there"], SamplingParams(max_tokens=2))
    assert out.prompt_logprobs is None
