"""wgemm, flavour by flavour: the exact product of the dequantized weights, one result per row
whatever its batch (the direct path of a few rows and the panel path of many), and the same bits
from every ISA flavour this CPU runs."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import build
from pagoda.kernels.wgemm import dequantize, pack, wgemm, wgemm_torch
from tests.kernels.helpers import (
    assert_flavours_agree,
    assert_rows_batch_invariant,
    make_weight,
    rel_err,
)

# (kind, N, K): N not a multiple of 16 is padded; K = 100 is no multiple of 32 (qgemm refuses it)
# "-h": scales and offsets exact in fp16 (GGUF's), which pack() keeps in fp16
SHAPES = [("q4g32", 40, 256), ("q4g32", 64, 576), ("q8g16", 33, 128), ("q8g32", 96, 256),
          ("int8", 50, 100), ("q4g64", 17, 192), ("q4g32-h", 40, 576), ("q8g32-h", 33, 256)]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_flavour_is_the_exact_product_of_the_dequantized_weights(flavour: str, shape, rows: int):
    kind, n, k = shape
    w = pack(make_weight(kind, n, k))
    torch.manual_seed(rows)
    x = torch.randn(rows, k) * torch.logspace(-2, 2, rows)[:, None]
    x[0, 17] = 300.0  # an outlier changes nothing: activations are not rounded
    y = wgemm(x, w, flavour)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    exact = x.double() @ dequantize(w).double().T
    assert rel_err(y, exact) < 1e-6
    assert rel_err(wgemm_torch(x, w), exact) < 1e-6


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_a_row_gives_the_same_bits_in_every_batch(flavour: str, shape):
    """A few rows (up to 8 with AVX2, 12 with AVX-512) take the direct path (widening in registers,
    as many vectors at once as the row count leaves registers for), more take the panel path, in
    tiles whose size depends on M: the row's bits must not change."""
    kind, n, k = shape
    w = pack(make_weight(kind, n, k, seed=3))
    assert_rows_batch_invariant(lambda x: wgemm(x, w, flavour), k)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_every_runnable_flavour_returns_the_same_bits(shape):
    flavours = build.runnable_flavours()
    if len(flavours) < 2:
        pytest.skip(f"this CPU runs only the {flavours} flavour: nothing to compare")
    kind, n, k = shape
    w = pack(make_weight(kind, n, k, seed=5))
    assert_flavours_agree(lambda x, f: wgemm(x, w, f), flavours, k)


@pytest.mark.parametrize("kind", ["q4g32", "q8g32", "q4g32-h", "q8g32-h"])
def test_scales_are_kept_in_fp16_only_when_every_one_is_exact(flavour: str, kind: str):
    stored = make_weight(kind, 48, 128, seed=7)
    w = pack(stored)
    half = kind.endswith("-h")
    assert w.scales.dtype == (torch.float16 if half else torch.float32)
    assert w.offsets.dtype == w.scales.dtype
    # the kernel's weights are the stored ones, in either form
    exact = (stored.scales.double().repeat_interleave(stored.group, dim=1)
             * dequantize_ints(stored).double())
    if stored.offsets is not None:
        exact += stored.offsets.double().repeat_interleave(stored.group, dim=1)
    assert torch.equal(dequantize(w), exact.float())
    x = torch.randn(3, 128)
    assert rel_err(wgemm(x, w, flavour), x.double() @ exact.T) < 1e-6


def dequantize_ints(w) -> torch.Tensor:
    if w.bits == 4:
        return torch.stack((w.q & 0x0F, w.q >> 4), dim=-1).reshape(w.q.shape[0], -1)
    return w.q


def test_bad_operands_are_refused(flavour: str):
    w = pack(make_weight("q4g32", 32, 64))
    with pytest.raises(RuntimeError, match="packed weights"):
        wgemm(torch.randn(2, 96), w, flavour)  # K does not match
    module = build.load(flavour)
    with pytest.raises(RuntimeError, match="n exceeds"):
        module.wgemm(torch.randn(1, 64), w.q, w.scales, w.offsets, 48, 4, 32)
    with pytest.raises(RuntimeError, match="typed like the scales"):
        module.wgemm(torch.randn(1, 64), w.q, w.scales, w.offsets.half(), 32, 4, 32)
