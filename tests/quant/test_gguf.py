"""GGUF-native conversion: our decoded blocks equal gguf's own dequantization bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from pagoda.quant.gguf_blocks import SUPPORTED, decode_blocks
from pagoda.quant.gguf_source import GGUFWeightSource

_BLOCK = {"Q8_0": (32, 34, [0]), "Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]),
          "Q5_0": (32, 22, [0]), "Q5_1": (32, 24, [0, 2]),
          "Q4_K": (256, 144, [0, 2]), "Q6_K": (256, 210, [208])}


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_random_blocks_decode_exactly_like_gguf(qtype: str):
    weights_per_block, block_bytes, fp16_at = _BLOCK[qtype]
    rng = np.random.default_rng(1)
    n, k = 5, 512
    raw = rng.integers(0, 256, size=(n, k // weights_per_block, block_bytes), dtype=np.uint8)
    for pos in fp16_at:  # finite fp16 scales (random bytes could spell inf / nan)
        scales = rng.uniform(-0.2, 0.2, size=raw.shape[:2]).astype(np.float16)
        raw[..., pos:pos + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(n, -1)
    ours = decode_blocks(raw, qtype, k).dequantize().numpy()
    ref = dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    assert ours.shape == ref.shape == (n, k)
    np.testing.assert_array_equal(ours, ref)


def _file_matrix(source: GGUFWeightSource, name: str, heads: int | None = None,
                 rows: slice = slice(None)) -> np.ndarray:
    t = source.tensors[name]
    w = dequantize(t.data[rows], t.tensor_type).reshape(-1, int(t.shape[0]))
    if heads:  # llama.cpp's q/k row permutation undone as MODEL_NOTES.md describes
        w = w.reshape(heads, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    return w


def test_real_file_fused_and_unpermuted_like_the_fp32_loader(gguf_source: GGUFWeightSource):
    src = gguf_source
    layer = 7
    qkv, qtypes = src.weights_for(f"layers.{layer}.self_attn.qkv_proj", "qkv_proj")
    assert qtypes == "Q4_1" and qkv.bits == 4 and qkv.shape == (960, 576)
    expected = np.concatenate([
        _file_matrix(src, f"blk.{layer}.attn_q.weight", src.num_heads),
        _file_matrix(src, f"blk.{layer}.attn_k.weight", src.num_kv_heads),
        _file_matrix(src, f"blk.{layer}.attn_v.weight")])
    np.testing.assert_array_equal(qkv.dequantize().numpy(), expected)

    gate_up, _ = src.weights_for(f"layers.{layer}.mlp.gate_up_proj", "gate_up_proj")
    expected = np.concatenate([_file_matrix(src, f"blk.{layer}.ffn_gate.weight"),
                               _file_matrix(src, f"blk.{layer}.ffn_up.weight")])
    np.testing.assert_array_equal(gate_up.dequantize().numpy(), expected)


def test_real_file_tied_lm_head_keeps_q8_0_blocks(gguf_source: GGUFWeightSource):
    src = gguf_source
    head, qtypes = src.weights_for("lm_head", "lm_head")
    assert qtypes == "Q8_0" and head.bits == 8 and head.group_size == 32
    rows = slice(1000, 1200)
    np.testing.assert_array_equal(head.dequantize(rows=rows).numpy(),
                                  _file_matrix(src, "token_embd.weight", rows=rows))
    # stored as int8 + one fp16 scale per 32 weights: 34 bytes per 32 weights, as in the file
    assert head.nbytes == 49152 * 576 // 32 * 34


def test_unknown_module_names_are_refused(gguf_source: GGUFWeightSource):
    src = gguf_source
    with pytest.raises(ValueError, match="layer index"):
        src.weights_for("mlp.down_proj", "down_proj")
    with pytest.raises(ValueError, match="no tensor"):
        src.weights_for("layers.99.mlp.down_proj", "down_proj")
    assert torch.is_tensor(src.weights_for("layers.0.mlp.down_proj", "down_proj")[0].scales)


def test_load_leaves_the_file_linears_unread_and_quantizes_to_the_same_model(gguf_path: str):
    """`load_model(file_linears=...)` (what every engine serving a GGUF file does) neither
    decodes nor allocates the linears gguf quantization rebuilds from the file; quantized, the
    model is the one a full load gives, tensor for tensor and logit for logit."""
    from torch import nn

    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization, file_linears
    from pagoda.quant.quality import prefill_logits

    lazy = load_model(gguf_path, progress=False, file_linears=file_linears("gguf"))
    net = lazy.model
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 4 * lazy.config.num_layers + 1
    assert all(m.weight.is_meta for n, m in linears.items() if n != "lm_head")
    # the tied LM head is the embedding table, which the model needs: read
    assert net.lm_head.weight is net.embed_tokens.weight
    assert not net.lm_head.weight.is_meta
    assert not any(t.is_meta for n, t in net.state_dict().items() if "_proj" not in n)

    full = load_model(gguf_path, progress=False)
    for loaded in (lazy, full):
        apply_quantization(loaded, "gguf")
    a, b = lazy.model.state_dict(), full.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = lazy.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    assert torch.equal(prefill_logits(lazy.model, lazy.config, ids),
                       prefill_logits(full.model, full.config, ids))
