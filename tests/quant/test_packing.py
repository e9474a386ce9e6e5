"""Exact round trips of the integer formats, and the rounding bounds of the quantizers."""

from __future__ import annotations

import pytest
import torch

from pagoda.quant.group_weights import (
    GroupWeights,
    WeightSlice,
    cat_rows,
    pack_int4,
    quantize_int4_groups,
    quantize_int8_per_channel,
    unpack_int4,
)


def test_int4_pack_unpack_round_trip_is_exact():
    q = torch.randint(0, 16, (37, 130), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (37, 65) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # element 2i sits in the low nibble of byte i
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_int8_per_channel_round_trip_within_half_a_step():
    w = torch.randn(50, 80) * torch.logspace(-3, 0, 50)[:, None]  # rows of very different scale
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    q2, scale2 = quantize_int8_per_channel(q.float() * scale[:, None])  # re-quantizing is stable
    assert torch.equal(q2, q)


def test_int4_groups_round_trip_within_half_a_step():
    w = torch.randn(24, 256)
    for group in (32, 64, 128):
        gw = quantize_int4_groups(w, group)
        assert gw.bits == 4 and gw.qweight.shape == (24, 128) and gw.shape == (24, 256)
        err = (gw.dequantize() - w).abs().view(24, 256 // group, group)
        step = gw.scales.float()[:, :, None]
        # half a step, plus the fp16 rounding of the offset
        assert bool((err <= step / 2 + gw.offsets.float().abs()[:, :, None] * 1e-3 + 1e-6).all())
        # packing the values again reproduces the stored bytes exactly
        assert torch.equal(pack_int4(gw.values()), gw.qweight)


def test_group_reshaping_is_exact():
    a = quantize_int4_groups(torch.randn(8, 64), 64)
    b = GroupWeights(torch.randint(-128, 128, (4, 64), dtype=torch.int8),
                     torch.rand(4, 2, dtype=torch.float32), None, 32, bits=8)
    fused = cat_rows([a, b])
    assert fused.shape == (12, 64) and fused.group_size == 32
    expected = torch.cat([a.dequantize(), b.dequantize()])
    assert torch.equal(fused.dequantize(), expected)
    order = torch.randperm(12)
    assert torch.equal(fused.permute_rows(order).dequantize(), expected[order])


def test_requantize_to_int8_adds_at_most_half_an_int8_step():
    gw = quantize_int4_groups(torch.randn(300, 128), 32)
    q, scale = gw.to_int8_per_channel()
    exact = gw.dequantize()
    assert bool(((q.float() * scale[:, None] - exact).abs() <= scale[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_slice_of_rows_and_columns_is_exact(bits: int):
    """What tensor parallelism cuts from a GGUF matrix: chosen rows (past the end: zero rows,
    the LM head's padding) and a group-aligned column range, bit for bit."""
    torch.manual_seed(0)
    w = quantize_int4_groups(torch.randn(10, 128), 32)
    if bits == 8:  # a symmetric 8-bit form (Q8_0-like)
        w = GroupWeights(unpack_int4(w.qweight).to(torch.int8) - 8, w.scales, None, 32, 8)
    part = WeightSlice(torch.tensor([7, 2, 3, 10, 11]), range(32, 96))
    got = w.take(part).dequantize()
    full = w.dequantize()
    assert torch.equal(got[:3], full[[7, 2, 3], 32:96])
    assert torch.equal(got[3:], torch.zeros(2, 64))
    with pytest.raises(ValueError, match="quantization groups"):
        w.take(WeightSlice(torch.tensor([0]), range(16, 64)))
