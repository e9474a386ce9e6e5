"""Greedy output is token-identical to Hugging Face transformers on the same GGUF weights."""

from __future__ import annotations

from pagoda.layers.dense_linear import resolve_kernel
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion

PROMPTS = [
    "The capital of France is",
    "Hi",
    "def quicksort(arr):\n    ",
    "Translate to French: The weather is nice today and I would like to go for a walk.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Auf Deutsch erklärt:",
    "东京是日本的首都。请用中文介绍一下东京：",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
    # longer than one 16-token block, several blocks
    "Once upon a time, in a small village nestled between rolling hills and a sparkling river, "
    "there lived an old clockmaker named Elias who had spent his whole life repairing the clocks "
    "of his neighbours. One winter morning, a stranger arrived with a clock unlike any other,",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
    "GROUP BY name HAVING",
]
MAX_TOKENS = 24


# The `prompt_ids` and `reference` (transformers' tokens) fixtures are in tests/conftest.py.
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_each_prompt_alone(make_engine, prompt_ids, reference):
    engine = make_engine()
    for i, ids in enumerate(prompt_ids):
        got = run_to_completion(engine, {"r": (ids, GREEDY)})["r"]
        assert got == reference[i], f"prompt {i} ({PROMPTS[i][:30]!r}) differs from transformers"
    engine.check_integrity()


def test_all_prompts_together(make_engine, prompt_ids, reference):
    engine = make_engine()
    got = run_to_completion(engine, {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)})
    for i in range(len(prompt_ids)):
        assert got[f"r{i}"] == reference[i], f"prompt {i} differs when batched"
    engine.check_integrity()
    assert engine.kv_manager.num_free_blocks == engine.kv_cache_config.num_blocks


def test_staggered_arrivals(make_engine, prompt_ids, reference):
    """Requests join while others are decoding (continuous batching, mixed prefill/decode)."""
    engine = make_engine(max_num_batched_tokens=64)
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)}
    arrivals = {f"r{i}": 3 * i for i in range(len(PROMPTS))}
    got = run_to_completion(engine, requests, arrivals=arrivals)
    for i in range(len(prompt_ids)):
        assert got[f"r{i}"] == reference[i], f"prompt {i} differs with staggered arrivals"
    engine.check_integrity()


def test_fused_ops_keep_the_reference_tokens(make_engine, prompt_ids, reference):
    """The C++ elementwise kernels (on by default, fp32 models too) asked for over the fp32
    weights: the same tokens as transformers, alone and batched with staggered arrivals —
    the check that the fused layer computes what the torch layer does. (Over quantized weights
    a last-bit change of an activation can flip its int8 rounding, so there the tokens are not
    comparable; tests/kernels/test_fused_ops.py checks the kernels themselves.)"""
    engine = make_engine(fused_ops=True, max_num_batched_tokens=64)
    assert engine.loaded.model.fused is not None
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)}
    arrivals = {f"r{i}": 2 * i for i in range(len(PROMPTS))}
    got = run_to_completion(engine, requests, arrivals=arrivals)
    for i in range(len(prompt_ids)):
        assert got[f"r{i}"] == reference[i], f"prompt {i} differs with fused ops"
    engine.check_integrity()
    # fp32's default with fgemm linears where its vector build runs; torch's product keeps
    # torch's elementwise ops (a chosen kernel never silently brings other bits)
    fgemm = resolve_kernel("auto") == "fgemm"
    assert (make_engine().loaded.model.fused is not None) == fgemm
    assert make_engine(fused_ops=False).loaded.model.fused is None
