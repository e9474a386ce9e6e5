"""The multi-threaded paths. `make test` gives each worker process one thread per torch op
(OMP_NUM_THREADS=1 in the Makefile) so that two test files run side by side on two cores; this
module sets two threads and checks what then changes hands between threads: oneDNN/MKL GEMMs
split across threads and the C++ kernels' `at::parallel_for` over rows and heads.

A request's tokens must not depend on the thread count any more than on its batch."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.engine.test_hf_reference import PROMPTS as ALL_PROMPTS

PROMPTS = ALL_PROMPTS[2::2]  # code, German, chat, SQL: one of each kind
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture
def threads():
    """Set the process's torch thread count for one test, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompt_ids(loaded_model):
    return [loaded_model.tokenizer.encode(p) for p in PROMPTS]


def generate(loaded, prompt_ids, num_threads: int) -> dict[str, list[int]]:
    """Each prompt alone, then all together, in an engine running `num_threads` threads."""
    engine = LLMEngine(EngineConfig(kv_cache_memory=64 << 20, progress=False,
                                    num_threads=num_threads), loaded=loaded)
    assert torch.get_num_threads() == num_threads
    out = {f"alone{i}": run_to_completion(engine, {"r": (ids, GREEDY)})["r"]
           for i, ids in enumerate(prompt_ids)}
    batched = run_to_completion(engine, {f"r{i}": (ids, GREEDY)
                                         for i, ids in enumerate(prompt_ids)})
    out |= {f"batched{i}": toks for i, toks in enumerate(batched.values())}
    engine.check_integrity()
    return out


@pytest.mark.parametrize("model", ["loaded_model", "gguf_draft"])
def test_tokens_do_not_depend_on_the_thread_count(threads, request, model, prompt_ids):
    """fp32 (whose one-thread tokens equal transformers', tests/engine/test_hf_reference.py), and
    the default model on its GGUF blocks (the native kernels' path; int4 groups run the same
    qgemm and fused kernels) with the batch-invariant attention quantized models get by default
    (inferred from the pre-quantized weights: the engine's own `quantization` is "none" here)."""
    loaded = request.getfixturevalue(model)
    one = generate(loaded, prompt_ids, num_threads=1)
    two = generate(loaded, prompt_ids, num_threads=2)
    assert one == two
    for i in range(len(prompt_ids)):
        assert one[f"alone{i}"] == one[f"batched{i}"], f"prompt {i} differs when batched"
