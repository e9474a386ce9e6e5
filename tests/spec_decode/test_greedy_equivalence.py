"""Greedy decoding with speculation on is token-identical to speculation off, for prompt lookup,
a draft model and the two together (hybrid): alone, in a busy batch, with prefix caching,
chunked prefill and forced preemption. Every run ends with all KV blocks free and the cache
consistent."""

from __future__ import annotations

import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.engine.test_hf_reference import PROMPTS

GREEDY = SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True)
# Prompts whose continuations quote them, so prompt lookup finds drafts that are accepted.
QUOTING = [
    "Repeat after me: the red fox ran past the old mill, the red fox ran past the old mill, "
    "the red fox",
    "<|im_start|>user\nCopy this list: apples, pears, plums, cherries, apples, pears, plums, "
    "cherries<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
]


@pytest.fixture(scope="module")
def prompts(loaded_model):
    # a subset of the HF-reference prompts (code, CJK, chat template, several blocks) + quoting
    chosen = [PROMPTS[i] for i in (2, 5, 6, 7)] + QUOTING
    return [loaded_model.tokenizer.encode(p) for p in chosen]


@pytest.fixture(scope="module")
def baseline(make_engine, prompts):
    engine = make_engine(max_num_seqs=1, enable_prefix_caching=False)
    return run_to_completion(engine, {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)})


def engine_maker(method, loaded_model, gguf_draft):
    """make(**overrides): an engine with the method under test."""

    def make(**overrides):
        overrides.setdefault("kv_cache_memory", 64 << 20)
        cfg = EngineConfig(progress=False, speculative_method=method,
                           speculative_max_batch=64, **overrides)
        return LLMEngine(cfg, loaded=loaded_model,
                         draft=None if method == "ngram" else gguf_draft)

    make.method = method
    return make


@pytest.fixture(scope="module", params=["ngram", "draft", "hybrid"])
def spec_engine(request, loaded_model, gguf_draft):
    return engine_maker(request.param, loaded_model, gguf_draft)


# With more than 2 requests drafting, hybrid drafts by lookup alone (as ngram, from longer
# matches): the busy tests below add nothing for it that ngram's and draft's do not cover.
@pytest.fixture(scope="module", params=["ngram", "draft"])
def busy_spec_engine(request, loaded_model, gguf_draft):
    return engine_maker(request.param, loaded_model, gguf_draft)


def check(engine, prompts, baseline, **kw):
    got = run_to_completion(engine, {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)}, **kw)
    for rid in baseline:
        assert got[rid] == baseline[rid], rid
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens > 0, "no draft was ever accepted: speculation idle"
    engine.check_integrity()
    assert engine.kv_manager.num_free_blocks == engine.kv_cache_config.num_blocks
    assert not engine.kv_manager.block_tables
    return stats


def test_alone(spec_engine, prompts, baseline):
    check(spec_engine(max_num_seqs=1, enable_prefix_caching=False), prompts, baseline)


def test_busy_batch(busy_spec_engine, prompts, baseline):
    stats = check(busy_spec_engine(max_num_seqs=32), prompts, baseline)
    assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens  # rejections happened


@pytest.fixture(scope="module")
def with_prefix(prompts, loaded_model):
    shared = loaded_model.tokenizer.encode("You are a careful assistant. " * 6)
    return [shared + p for p in prompts]


@pytest.fixture(scope="module")
def with_prefix_baseline(make_engine, with_prefix):
    """Speculation off, prefix caching off: one run serves both methods' tests."""
    engine = make_engine(enable_prefix_caching=False)
    return run_to_completion(engine, {f"r{i}": (p, GREEDY) for i, p in enumerate(with_prefix)})


def test_staggered_with_prefix_caching(busy_spec_engine, with_prefix, with_prefix_baseline):
    ref = with_prefix_baseline
    engine = busy_spec_engine(enable_prefix_caching=True)
    check(engine, with_prefix, ref, arrivals={f"r{i}": 2 * i for i in range(len(with_prefix))})
    assert engine.kv_manager.num_hit_tokens > 0


def test_chunked_prefill(spec_engine, prompts, baseline):
    check(spec_engine(max_num_batched_tokens=16), prompts, baseline)


def test_forced_preemption(spec_engine, prompts, baseline):
    # ~10 target blocks of 16 tokens (a draft's share comes on top): far less than 7 requests need
    blocks = 10 * (1 if spec_engine.method == "ngram" else 2)
    engine = spec_engine(kv_cache_memory=blocks * 16 * 46080, enable_prefix_caching=True)
    check(engine, prompts, baseline)
    assert engine.scheduler.num_preemptions > 0
