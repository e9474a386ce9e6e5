"""A quantized model's greedy tokens do not depend on the batch a request lands in.

qgemm computes each row the same way in any batch, and with `invariant_attention` (on by default
for quantized models) prefill queries attend through the same kernel as decodes, so a prompt
computed in one prefill, in chunks, after a prefix-cache hit, or next to other requests gives
bit-identical logits, hence identical greedy tokens. With int8 activations even a last-ulp
difference can flip a rounding and, where two logits are close, a greedy token; these
prompts include such close calls (with `invariant_attention` off, gguf diverges on them).
"""

from __future__ import annotations

import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.quant.quality import run_engine

PROMPTS = [
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
OTHERS = [f"Write a short note about the number {i}:" for i in range(6)]


@pytest.fixture(scope="module", params=["int8", "gguf"])
def quantized(request):
    from pagoda.loader.model_loader import load_model
    from pagoda.quant.loading import apply_quantization

    loaded = load_model(progress=False)
    apply_quantization(loaded, request.param)
    return request.param, loaded


def _engine(loaded, **overrides) -> LLMEngine:
    config = EngineConfig(quantization="none", kv_cache_memory=64 << 20, progress=False,
                          invariant_attention=True, **overrides)
    return LLMEngine(config, loaded=loaded)  # the weights are already quantized


# each read in place by the kernel; auto is bf16 for these quantized weights
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp32", "fp16"])
def test_alone_chunked_cached_and_batched_give_the_same_tokens(quantized, kv_cache_dtype):
    mode, loaded = quantized
    alone = [run_engine(_engine(loaded, enable_prefix_caching=False,
                                kv_cache_dtype=kv_cache_dtype), [p], 12).token_ids[0]
             for p in PROMPTS]
    # chunks of 8 tokens per step, several requests together
    chunked = run_engine(_engine(loaded, max_num_batched_tokens=8, enable_prefix_caching=False,
                                 kv_cache_dtype=kv_cache_dtype), PROMPTS, 12).token_ids
    assert chunked == alone, mode
    # the same engine twice: the second pass finds the prompts' blocks in the prefix cache
    engine = _engine(loaded, kv_cache_dtype=kv_cache_dtype)
    assert engine.runner.invariant_attention
    first = run_engine(engine, [*PROMPTS, *OTHERS], 12).token_ids[: len(PROMPTS)]
    hits = engine.kv_manager.num_hit_tokens
    again = run_engine(engine, [*OTHERS[:3], *PROMPTS, *OTHERS[3:]], 12).token_ids[3:6]
    assert engine.kv_manager.num_hit_tokens > hits, "the repeat should hit the prefix cache"
    assert first == alone and again == alone, mode


def test_an_auto_cache_is_bf16_under_quantized_linears_and_fp32_under_fp32_ones(quantized,
                                                                              loaded_model):
    """EngineConfig.settle_for_weights: the cache of a model with quantized linears is bf16
    (half the bytes a decode step reads; fp32's exponent range), an fp32 model's stays fp32
    (transformers' tokens), and an explicit choice is kept."""
    _, loaded = quantized
    assert _engine(loaded).kv_groups[0].kv_dtype == "bf16"
    assert _engine(loaded, kv_cache_dtype="fp32").kv_groups[0].kv_dtype == "fp32"
    fp32 = LLMEngine(EngineConfig(quantization="none", kv_cache_memory=64 << 20, progress=False),
                     loaded=loaded_model)
    assert fp32.kv_groups[0].kv_dtype == "fp32"
    half = _engine(loaded)
    assert half.kv_groups[0].num_blocks == 2 * _engine(
        loaded, kv_cache_dtype="fp32").kv_groups[0].num_blocks
