"""igemm, flavour by flavour: its torch twin's arithmetic (activations rounded per 32-block, exact
integer products), one result per row whatever its batch and tile, the same bits from every ISA
flavour this CPU runs, and no saturation at the integers' extremes."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import build
from pagoda.kernels.igemm import igemm, igemm_torch, pack, shape_supported, values
from pagoda.kernels.qgemm import QGemmWeight
from tests.kernels.helpers import (
    assert_flavours_agree,
    assert_rows_batch_invariant,
    make_weight,
    rel_err,
)

# (kind, N, K): N not a multiple of 16 is padded; "-h": fp16-exact scales (kept in fp16); q8:
# signed 8-bit (Q8_0, with offsets, int8 per channel)
SHAPES = [("q4g32", 40, 256), ("q4g32-h", 64, 576), ("q4g64", 17, 192), ("q4g32-h", 33, 1536),
          ("q8g32-h", 40, 576), ("q8g32-off", 17, 256), ("int8", 33, 192)]
ROWS = [1, 2, 3, 4, 5, 7, 8, 12, 13, 25, 64]


def _no_offsets(w: QGemmWeight) -> QGemmWeight:
    return QGemmWeight(w.q, w.scales, None, w.bits, w.group)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_flavour_computes_its_torch_twins_arithmetic(flavour: str, shape, rows: int):
    kind, n, k = shape
    stored = make_weight(kind, n, k)
    for weight in (stored, _no_offsets(stored)):
        w = pack(weight)
        torch.manual_seed(rows)
        x = torch.randn(rows, k) * torch.logspace(-2, 2, rows)[:, None]
        y = igemm(x, w, flavour)
        assert y.shape == (rows, n) and y.dtype == torch.float32
        assert rel_err(y, igemm_torch(x, w)) < 1e-6
        # against the unrounded product: only the activations' 8-bit rounding is lost
        scales = weight.scales.repeat_interleave(weight.group, dim=1)
        exact = values(w).double() * scales.double()
        if weight.offsets is not None:
            exact += weight.offsets.double().repeat_interleave(weight.group, dim=1)
        assert rel_err(y, x.double() @ exact.T) < 0.03


@pytest.mark.parametrize("kind", ["q4g32", "q8g32"])
def test_packing_keeps_every_integer_and_refuses_what_it_cannot_take(kind: str):
    w = make_weight(kind, 35, 256, seed=2)
    unpacked = (torch.stack((w.q & 0x0F, w.q >> 4), dim=-1).reshape(35, 256)
                if w.bits == 4 else w.q)
    assert torch.equal(values(pack(w)), unpacked)
    assert shape_supported(256, 32, 8) and shape_supported(256, 256, 8)
    assert not shape_supported(256, 16, 4) and not shape_supported(256, 16, 8)
    with pytest.raises(ValueError, match="8-bit groups of 16"):
        pack(make_weight("q8g16", 16, 256))


def test_extreme_integers_do_not_saturate(flavour: str):
    """Every weight 15 and every activation rounded to +-127: a block's int16 lanes reach their
    largest sums (8 pairs of 2 * 15 * 127 = 30480), and the result is still exact."""
    n, k = 32, 256
    q = torch.full((n, k // 2), 0xFF, dtype=torch.uint8)
    w = pack(QGemmWeight(q, torch.ones(n, k // 32), None, 4, 32))
    for sign in (1.0, -1.0):
        x = torch.full((3, k), sign * 0.5)
        y = igemm(x, w, flavour)
        # each block: d = 0.5 / 127, q = 127: d * 32 * 15 * 127 = 240 per block, 8 blocks
        assert torch.allclose(y, torch.full((3, n), sign * 1920.0), rtol=1e-6)


@pytest.mark.parametrize("weight", [-128, 127])
def test_extreme_8bit_integers_stay_exact(flavour: str, weight: int):
    """Every weight -128 or 127 against activations rounded to +-127: int16 pair sums of
    2 * 128 * 127 and block sums of 32 of them, exact in int32."""
    n, k = 32, 256
    q = torch.full((n, k), weight, dtype=torch.int8)
    w = pack(QGemmWeight(q, torch.ones(n, k // 32), None, 8, 32))
    for sign in (1.0, -1.0):
        x = torch.full((3, k), sign * 0.5)
        y = igemm(x, w, flavour)
        # each block: d = 0.5 / 127, q = 127: d * 32 * weight * 127 = 16 * weight, 8 blocks
        assert torch.equal(y, torch.full((3, n), sign * 128.0 * weight))


def test_zero_rows_give_the_offsets_part_alone(flavour: str):
    w = pack(make_weight("q4g32", 20, 128, seed=4))
    x = torch.zeros(2, 128)
    x[1, :32] = 1.0  # a row whose other blocks are zero (d = 0 there)
    y = igemm(x, w, flavour)
    assert torch.equal(y[0], torch.zeros(20))
    assert rel_err(y[1:], igemm_torch(x[1:], w)) < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_activation_makes_its_row_nan_and_spares_the_others(flavour: str, bad):
    """As the fp32 product would: no NaN is rounded to an integer, no other row is touched."""
    w = pack(_no_offsets(make_weight("q4g32", 24, 128, seed=6)))
    x = torch.randn(3, 128)
    clean = igemm(x, w, flavour)
    x[1, 70] = bad
    y = igemm(x, w, flavour)
    assert torch.isnan(y[1]).all()
    assert torch.equal(y[0], clean[0]) and torch.equal(y[2], clean[2])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_a_row_gives_the_same_bits_in_every_batch(flavour: str, shape):
    """Rows are computed in tiles of 4 (avx2, generic) or 8 (avx512) whose size depends on M:
    a row's bits must not change with its batch or its place in it."""
    kind, n, k = shape
    w = pack(make_weight(kind, n, k, seed=3))
    assert_rows_batch_invariant(lambda x: igemm(x, w, flavour), k)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_every_runnable_flavour_returns_the_same_bits(shape):
    flavours = build.runnable_flavours()
    if len(flavours) < 2:
        pytest.skip(f"this CPU runs only the {flavours} flavour: nothing to compare")
    kind, n, k = shape
    w = pack(make_weight(kind, n, k, seed=5))
    assert_flavours_agree(lambda x, f: igemm(x, w, f), flavours, k)


@pytest.mark.parametrize("kind", ["q4g32", "q8g32"])
def test_bad_operands_are_refused_by_name(flavour: str, kind: str):
    """Both entry points check their operands alike (igemm_call.h) and name themselves."""
    w = pack(make_weight(kind, 32, 256))
    product = build.load(flavour).igemm if w.bits == 4 else build.load(flavour).igemm8
    name = "igemm" if w.bits == 4 else "igemm8"
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match=f"{name}: packed weights must be"):
        product(x, w.q[:, :-1], w.scales, w.offsets, 32, 32)
    with pytest.raises(RuntimeError, match=f"{name}: x must be a 2-D fp32"):
        product(x.double(), w.q, w.scales, w.offsets, 32, 32)
    with pytest.raises(RuntimeError, match=f"{name}: the group must be a multiple of 32"):
        product(x, w.q, w.scales, w.offsets, 32, 48)
    empty = product(x[:0], w.q, w.scales, w.offsets, 30, 32)
    assert empty.shape == (0, 30)


@pytest.mark.parametrize("kind", ["q4g32", "q8g32-off"])
def test_non_contiguous_operands_give_the_same_bits(flavour: str, kind: str):
    """Operands that are views get a contiguous copy, which the call keeps alive while the tiles
    read it: the result equals the contiguous operands' bit for bit."""
    w = pack(make_weight(kind, 40, 256, seed=7))
    module = build.load(flavour)
    product = module.igemm if w.bits == 4 else module.igemm8
    x = torch.randn(5, 256)

    def strided(t: torch.Tensor) -> torch.Tensor:  # the same values, not contiguous
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    want = product(x, w.q, w.scales, w.offsets, 40, w.group)
    got = product(strided(x), strided(w.q), strided(w.scales), strided(w.offsets), 40, w.group)
    assert not strided(w.scales).is_contiguous()
    assert torch.equal(got, want)
