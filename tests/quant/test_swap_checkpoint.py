"""Module swap selects linears by kind; save -> load reproduces outputs exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.quant import (
    QuantConfig,
    load_quantized,
    quantize_model,
    quantized_modules,
    read_checkpoint_meta,
    save_quantized,
    weight_bytes,
)
from pagoda.quant.group_linear import GroupLinear
from pagoda.quant.int8_linear import Int8Linear

from .conftest import TinyModel, rel_err, smollm2_shaped, tiny_model

KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def _kinds(model: nn.Module) -> dict[str, str]:
    return {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or name in quantized_modules(model)}


def test_swap_selects_by_kind_and_keeps_the_embedding(model: TinyModel):
    embedding = model.embed_tokens.weight.detach().clone()
    quantize_model(model, QuantConfig(method="int8", skip=("lm_head", "down_proj")))
    assert _kinds(model) == {"qkv_proj": "Int8Linear", "o_proj": "Int8Linear",
                             "gate_up_proj": "Int8Linear", "down_proj": "Linear",
                             "lm_head": "Linear"}
    assert len(quantized_modules(model)) == 6  # 3 kinds x 2 layers
    assert model.lm_head.weight is model.embed_tokens.weight  # tie untouched when skipped
    assert torch.equal(model.embed_tokens.weight, embedding)


def test_quantized_lm_head_leaves_the_tied_embedding_in_fp32(model: TinyModel):
    quantize_model(model, QuantConfig(method="int4", group_size=32))
    assert isinstance(model.lm_head, GroupLinear)
    assert model.embed_tokens.weight.dtype == torch.float32
    assert weight_bytes(model)["dense_linear"] == 0


def test_method_none_and_bad_configs():
    model = tiny_model()
    assert quantize_model(model, QuantConfig(method="none")) is model
    assert not quantized_modules(model)
    with pytest.raises(ValueError, match="unknown linear kinds"):
        QuantConfig(method="int8", skip=("lm_haed",))
    with pytest.raises(ValueError, match="gguf_path"):
        QuantConfig(method="gguf")


def test_dtype_casts_do_not_touch_quantized_buffers(model: TinyModel):
    quantize_model(model, QuantConfig(method="int4", group_size=32))
    x = torch.randn(3, 64)
    before = model.lm_head(x)
    model.to(torch.bfloat16)  # the embedding follows; quantized modules only change device
    head = model.lm_head
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert head.scales.dtype == torch.float16 and head.qweight.dtype == torch.uint8
    assert torch.equal(head(x), before)


@pytest.mark.parametrize("method", ["int8", "int4", "fp16", "bf16"])
def test_save_load_round_trip_is_identical(method: str, tmp_path):
    model = tiny_model()
    ref = model(torch.arange(10))
    config = QuantConfig(method=method, group_size=32,
                         skip=("lm_head",) if method == "int8" else ())
    quantize_model(model, config)
    ids = torch.arange(10)
    out = model(ids)
    assert rel_err(out, ref) < 0.2  # sanity: still the same model
    save_quantized(model, str(tmp_path), config, model_config={"name": "tiny"})
    with torch.device("meta"):
        skeleton = TinyModel()
    loaded = load_quantized(str(tmp_path), skeleton)
    assert torch.equal(loaded(ids), out)
    if method == "int8":  # the fp32 tied lm_head was stored once and re-tied
        assert read_checkpoint_meta(str(tmp_path))["aliases"] == {
            "lm_head.weight": "embed_tokens.weight"}
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_gguf_swap_save_load(gguf_source, tmp_path):
    with torch.device("meta"):
        model = smollm2_shaped(num_layers=2)  # no fp32 weights needed: gguf reads its own
    config = QuantConfig(method="gguf", gguf_path=gguf_source.path, skip=("lm_head",))
    quantize_model(model, config, gguf_source=gguf_source)
    assert _kinds(model)["down_proj"] == "GroupLinear"
    down = model.layers[1].mlp.down_proj
    assert isinstance(down, GroupLinear) and down.source == "Q4_1" and down.bits == 4
    x = torch.randn(4, 1536)
    y = down(x)
    model.embed_tokens.to_empty(device="cpu")
    model.lm_head.to_empty(device="cpu")
    save_quantized(model, str(tmp_path), config, model_config={"name": "smollm2-2-layers"})
    with torch.device("meta"):
        skeleton = smollm2_shaped(num_layers=2)
    loaded = load_quantized(str(tmp_path), skeleton)
    assert torch.equal(loaded.layers[1].mlp.down_proj(x), y)


def test_int8_checkpoint_rebuilds_int8_modules(tmp_path):
    model = tiny_model()
    quantize_model(model, QuantConfig(method="int8"))
    save_quantized(model, str(tmp_path), QuantConfig(method="int8"))
    with torch.device("meta"):
        skeleton = TinyModel()
    loaded = load_quantized(str(tmp_path), skeleton)
    assert isinstance(loaded.layers[0].self_attn.qkv_proj, Int8Linear)
    assert loaded.layers[0].self_attn.qkv_proj.qweight.device.type == "cpu"


@pytest.mark.parametrize("backend", ["auto", "qgemm", "fbgemm"])
def test_dtype_cast_keeps_kernel_forms_and_device_move_drops_them(model: TinyModel,
                                                                   backend: str):
    quantize_model(model, QuantConfig(method="int8", backend=backend))
    head = model.lm_head

    def form() -> object:
        return {"fbgemm": head._packed, "qgemm": head.built_form("qgemm"),
                "auto": head.built_form("igemm")}[backend]

    head.prepare()
    built = form()
    assert built is not None
    if backend == "fbgemm":
        assert head.packed_bytes() == head.in_features * head.out_features
    elif backend == "qgemm":  # qgemm reads the stored int8 weight and scales in place: no copy
        assert head.packed_bytes() == 0 and built.q is head.qweight
    else:  # igemm reads a repacked copy: one byte per weight, fp32 scales
        assert head.packed_bytes() >= head.in_features * head.out_features
    model.to(torch.bfloat16)
    assert form() is built
    model.to("meta")
    assert form() is None and head.built_form("qgemm") is None and head.qweight.is_meta


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_retying_the_embedding_leaves_a_quantized_head_alone(model: TinyModel, method: str):
    """The model's post_load re-ties lm_head.weight to the embedding after a load."""
    quantize_model(model, QuantConfig(method=method))
    x = torch.randn(2, 64)
    before = model.lm_head(x)
    model.lm_head.weight = model.embed_tokens.weight
    assert not list(model.lm_head.parameters())
    assert torch.equal(model.lm_head(x), before)
    model.to(torch.float32)  # used to fail: the fp16 buffer had become a parameter
