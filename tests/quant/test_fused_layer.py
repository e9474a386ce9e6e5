"""A quantized Llama layer as one C++ call (kernels/csrc/decode_layer.cpp), and all the layers as
one call per step (LlamaDecodeStack), compute exactly what the per-op fused path computes — the
same tokens and bit-identical log-probs, over a batch with prefill and decode rows and
prefix-cache hits — and they are what quantized steps run by default."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.llm import LLM
from pagoda.layers.dense_linear import resolve_kernel
from pagoda.layers.fused_ops import FusedOps
from pagoda.sampling.params import SamplingParams

SHARED = "You are a careful assistant. Answer in one or two sentences.\n"
PROMPTS = [SHARED + p for p in (
    "What is the boiling point of water at sea level?",
    "Name a prime number larger than 50.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "def add(a, b):",
)]


@pytest.mark.parametrize("weights", ["gguf_draft", "int4_draft", "loaded_model"])
def test_one_call_layers_equal_the_per_op_path(request: pytest.FixtureRequest, weights: str):
    """Quantized copies of the default model by default; the fp32 model (fgemm linears) when
    asked for with `fused_ops="on"`."""
    loaded = request.getfixturevalue(weights)
    fp32 = weights == "loaded_model"
    if fp32 and resolve_kernel("auto") != "fgemm":
        pytest.skip("fgemm's vector builds do not run here: fp32 linears are not one-call")
    engine = LLMEngine(EngineConfig(kv_cache_memory=64 << 20, progress=False,
                                    max_num_batched_tokens=48,
                                    fused_ops=True if fp32 else None,
                                    # prefill rows through the decode kernel too, as quantized
                                    # engines do by default: then prefix-cache hits change no bit
                                    invariant_attention=True), loaded=loaded)
    ops = engine.loaded.model.fused
    assert ops is not None and ops.whole_layers, "the engine runs the fused kernels"
    try:
        check_one_call_layers(engine, ops)
    finally:  # the shared fp32 model leaves with no fused kernels (the next engine sets its own)
        if fp32:
            engine.loaded.model.use_fused_ops(None)


def check_one_call_layers(engine: LLMEngine, ops: FusedOps) -> None:
    llm = LLM.from_engine(engine)
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=3, ignore_eos=True)
    stacked = llm.generate(PROMPTS, params)
    assert ops.num_layer_calls > 0, "no layer ran as one call"
    assert engine.loaded.model._stack is not None, "the layers never ran as one stack"
    runs = {"stacked": stacked}
    for name, (layers, model) in {"per layer": (True, False), "per op": (False, False)}.items():
        engine.loaded.model.use_fused_ops(FusedOps(ops.module, whole_layers=layers,
                                                   whole_model=model))
        runs[name] = llm.generate(PROMPTS, params)  # now with prefix-cache hits on SHARED
    for name, outs in runs.items():
        for a, b in zip(stacked, outs, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, name
            assert a.outputs[0].logprobs == b.outputs[0].logprobs, name
    engine.check_integrity()


@pytest.mark.parametrize("change", ["in place", "replaced", "loader"])
def test_the_stack_follows_weights_changed_after_it_was_built(loaded_model, change: str):
    """New weights loaded into a served fp32 model (in place, or a new Parameter) reach decode
    steps too: the one-call stack holds fgemm's packed copies, made once, and is rebuilt when
    a weight it was made from changes. Decoded tokens then equal the per-layer path's."""
    if resolve_kernel("auto") != "fgemm":
        pytest.skip("fgemm's vector builds do not run here: fp32 linears are not one-call")
    engine = LLMEngine(EngineConfig(kv_cache_memory=64 << 20, progress=False, fused_ops=True),
                       loaded=loaded_model)
    model = engine.loaded.model
    llm = LLM.from_engine(engine)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    linear = model.layers[2].mlp.down_proj
    original = linear.weight
    saved = original.detach().clone()
    try:
        before = llm.generate(PROMPTS[:2], params)
        assert model._stack is not None, "decode ran as one stack"
        changed = original.detach() * 0.25
        if change == "in place":
            with torch.no_grad():
                original.copy_(changed)
        elif change == "loader":  # the model's own weight loader, as a reload would run it
            from pagoda.models.weight_loading import _copy_weights

            with torch.no_grad():
                _copy_weights(dict(model.named_parameters()), model.config,
                              [("model.layers.2.mlp.down_proj.weight", changed)], set())
        else:
            linear.weight = torch.nn.Parameter(changed, requires_grad=False)
        stacked = llm.generate(PROMPTS[:2], params)
        model.use_fused_ops(FusedOps(model.fused.module, whole_model=False))
        per_layer = llm.generate(PROMPTS[:2], params)
    finally:
        if change in ("in place", "loader"):
            with torch.no_grad():
                original.copy_(saved)
        linear.weight = original
        model.use_fused_ops(None)
    ids = [[o.outputs[0].token_ids for o in run] for run in (before, stacked, per_layer)]
    assert ids[0] != ids[1], "the changed weight changed nothing: the test proves nothing"
    assert ids[1] == ids[2]
