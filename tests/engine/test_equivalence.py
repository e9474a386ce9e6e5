"""Every optimization on vs off gives identical greedy tokens, and all blocks end up free:
chunked prefill, a KV budget so small that requests are preempted, batch 1 vs 32, prefix caching."""

from __future__ import annotations

import random

import pytest

from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(loaded_model):
    rng = random.Random(0)
    words = ("the of and a to in is you that it he was for on are as with his they at be this "
             "from have or by one had not but what all were when we there can an your which "
             "their said if do will each about how up out them then she many some so these "
             "would other into has more her two like him see time could no make than first").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(32)]
    return [loaded_model.tokenizer.encode(t) for t in texts]


@pytest.fixture(scope="module")
def baseline(make_engine, prompts):
    """Each prompt alone (batch size 1), no chunking, no prefix caching."""
    engine = make_engine(enable_chunked_prefill=False, enable_prefix_caching=False,
                         max_num_seqs=1)
    out = run_to_completion(engine, {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)})
    engine.check_integrity()
    return out


def check(engine, prompts, baseline, **kw):
    got = run_to_completion(engine, {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)}, **kw)
    assert got == baseline
    engine.check_integrity()
    assert engine.kv_manager.num_free_blocks == engine.kv_cache_config.num_blocks
    assert not engine.kv_manager.block_tables


def test_batch_32_equals_batch_1(make_engine, prompts, baseline):
    check(make_engine(max_num_seqs=32, enable_prefix_caching=False), prompts, baseline)


def test_chunked_prefill_equals_unchunked(make_engine, prompts, baseline):
    engine = make_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    check(engine, prompts, baseline)


def test_preemption_under_tiny_kv_budget(make_engine, prompts, baseline):
    # room for ~12 blocks of 16 tokens: far less than 32 running requests need
    engine = make_engine(kv_cache_memory=12 * 16 * 46080, enable_prefix_caching=False)
    assert engine.kv_cache_config.num_blocks == 12
    check(engine, prompts, baseline)
    assert engine.scheduler.num_preemptions > 0


def test_prefix_caching_equals_no_caching(make_engine, prompts, baseline, loaded_model):
    engine = make_engine(enable_prefix_caching=True)
    shared = loaded_model.tokenizer.encode("You are a careful assistant. " * 8)
    with_prefix = [shared + p for p in prompts[:8]]
    ref = run_to_completion(make_engine(enable_prefix_caching=False),
                            {f"r{i}": (p, GREEDY) for i, p in enumerate(with_prefix)})
    got = run_to_completion(engine, {f"r{i}": (p, GREEDY) for i, p in enumerate(with_prefix)},
                            arrivals={f"r{i}": i for i in range(8)})
    assert got == ref
    assert engine.kv_manager.num_hit_tokens >= 7 * (len(shared) // 16) * 16
    engine.check_integrity()


def test_preemption_with_prefix_caching(make_engine, prompts, baseline):
    engine = make_engine(kv_cache_memory=12 * 16 * 46080, enable_prefix_caching=True)
    check(engine, prompts, baseline)


def test_prefix_shared_by_simultaneous_requests(make_engine, prompts, loaded_model):
    """All arrive in one step: later ones wait for the first to compute the shared blocks
    (which are more than half of each prompt here, so waiting a step is worth it)."""
    shared = loaded_model.tokenizer.encode("You are a careful assistant. " * 24)
    assert all(len(shared) >= len(p) for p in prompts[:8])
    with_prefix = {f"r{i}": (shared + p, GREEDY) for i, p in enumerate(prompts[:8])}
    ref = run_to_completion(make_engine(enable_prefix_caching=False), with_prefix)
    engine = make_engine(enable_prefix_caching=True)
    assert run_to_completion(engine, with_prefix) == ref
    assert engine.kv_manager.num_hit_tokens == 7 * (len(shared) // 16) * 16
    engine.check_integrity()


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_paged_decode_kernels_equal_gather_sdpa(make_engine, prompts, baseline, backend):
    check(make_engine(max_num_seqs=32, enable_prefix_caching=False, attention_backend=backend),
          prompts, baseline)


@pytest.mark.parametrize("kv_cache_dtype", ["fp16", "bf16"])
def test_half_precision_cache_read_in_place_equals_gathered(make_engine, prompts,
                                                            kv_cache_dtype):
    """The C++ kernel reads fp16 / bf16 blocks where they lie; the torch path gathers and widens
    the same stored values: the same greedy tokens, 32 requests at once."""
    runs = {}
    for backend in ("torch", "cpp"):
        engine = make_engine(max_num_seqs=32, enable_prefix_caching=False,
                             attention_backend=backend, kv_cache_dtype=kv_cache_dtype)
        runs[backend] = run_to_completion(engine, {f"r{i}": (p, GREEDY)
                                                   for i, p in enumerate(prompts)})
        engine.check_integrity()
    assert runs["cpp"] == runs["torch"]
