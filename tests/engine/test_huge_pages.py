"""EngineConfig.huge_pages: the linears' kernel weight forms move into 2 MiB pages at load, and
the tokens are the same bits as with the weights left in 4 KiB pages (fp32 on fgemm, and the
default GGUF blocks on igemm)."""

from __future__ import annotations

import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.kernels import huge_pages
from pagoda.loader.model_loader import load_model
from pagoda.quant import apply_quantization
from pagoda.sampling.params import SamplingParams
from pagoda.worker.model_setup import kernel_tensors
from tests.engine.helpers import run_to_completion
from tests.kernels.test_huge_pages import huge_kib, needs_thp

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@needs_thp
@pytest.mark.parametrize("quantization", ["none", "gguf"])
def test_same_tokens_with_weights_in_huge_pages(loaded_model, prompt_ids, quantization):
    engines = {}
    for on in (False, True):
        fresh = load_model(loaded_model.path, progress=False)
        if quantization != "none":
            apply_quantization(fresh, quantization)
        engines[on] = LLMEngine(EngineConfig(progress=False, kv_cache_memory=64 << 20,
                                             huge_pages=on), loaded=fresh)
    # every layer's linears (with 4 KiB pages some may sit in huge pages by chance: glibc's
    # arenas can get them, so the engine without them is not checked for their absence)
    big = [t for t in kernel_tensors(engines[True].loaded)
           if t.numel() * t.element_size() >= huge_pages.MIN_BYTES]
    assert len(big) > 60 and all(huge_kib(t) > 0 for t in big)
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)}
    assert run_to_completion(engines[True], requests) == run_to_completion(engines[False],
                                                                           requests)
    engines[True].check_integrity()
