"""qgemm, flavour by flavour, against its torch reference (`qgemm_torch`, the exact product of
the block-rounded activations) and against the product with exact activations."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import build
from pagoda.kernels.qgemm import qgemm, qgemm_torch, quantize_blocks_torch
from tests.kernels.helpers import make_weight, rel_err

KINDS = ["int8", "q4g32", "q4g64", "q8g16", "q8g32", "q8g32-off"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 64])
def test_flavour_equals_its_reference(flavour: str, kind: str, rows: int):
    w = make_weight(kind, 40, 256)
    torch.manual_seed(rows)
    x = torch.randn(rows, 256) * torch.logspace(-2, 2, rows)[:, None]
    x[0, 17] = 300.0  # an outlier: it coarsens only its own block
    y = qgemm(x, w, flavour)
    ref = qgemm_torch(x, w)
    assert y.shape == (rows, 40) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5, "the kernel does not compute what it claims"


@pytest.mark.parametrize("kind", KINDS)
def test_block_rounding_keeps_the_product_close(flavour: str, kind: str):
    w = make_weight(kind, 64, 512, seed=1)
    x = torch.randn(8, 512)
    x[:, 3] *= 50.0  # an outlier channel, as SmolLM2's down_proj inputs have
    from pagoda.kernels.qgemm import dequantize

    scale_part, offset_part = dequantize(w)
    exact = x @ (scale_part + (0 if offset_part is None else offset_part)).T
    # one outlier channel coarsens its 32-block in every row: measured 0.011-0.015
    assert rel_err(qgemm(x, w, flavour), exact) < 0.02


def test_a_row_gives_the_same_bits_in_any_batch(flavour: str):
    """The batch-invariance the engine relies on: row r's output is bit-identical whether it is
    computed alone, at another position, or among 1, 3, 5 or 64 other rows."""
    for kind in KINDS:
        w = make_weight(kind, 48, 576 if kind != "q4g64" else 512, seed=2)
        k = w.in_features
        x = torch.randn(64, k)
        full = qgemm(x, w, flavour)
        for rows in (slice(0, 1), slice(5, 6), slice(3, 7), slice(10, 15), slice(60, 64)):
            assert torch.equal(qgemm(x[rows], w, flavour), full[rows]), (kind, rows)
        perm = torch.randperm(64)
        assert torch.equal(qgemm(x[perm], w, flavour), full[perm]), kind


def test_flavours_agree_with_each_other():
    """Same integer dots everywhere; only fp32 summation order differs between flavours."""
    runnable = [f for f in build.FLAVOURS if build.can_run(f)]
    if len(runnable) < 2:
        pytest.skip(f"only {runnable} runs on this CPU")
    w = make_weight("q4g32", 96, 576, seed=3)
    x = torch.randn(6, 576)
    outs = [qgemm(x, w, f) for f in runnable]
    for y in outs[1:]:
        assert rel_err(y, outs[0]) < 1e-6


def test_block_quantizer_equals_its_torch_twin(flavour: str):
    x = torch.randn(9, 320) * torch.logspace(-4, 4, 9)[:, None]
    x[2, :32] = 0.0  # an all-zero block: scale 0, values 0
    q, d = build.load(flavour).quantize_blocks(x)
    tq, td = quantize_blocks_torch(x)
    assert torch.equal(q, tq) and torch.equal(d, td)
    assert int(q.abs().max()) == 127 and bool((d[2, 0] == 0) & (q[2, :32] == 0).all())


def test_bad_shapes_are_refused(flavour: str):
    module = build.load(flavour)
    assert not module.shape_supported(100, 100, 8)  # K not a multiple of 32
    assert not module.shape_supported(512, 16, 4)  # 4-bit groups must be multiples of 32
    assert module.shape_supported(512, 16, 8) and module.shape_supported(576, 576, 8)
    w = make_weight("q4g32", 8, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        module.qgemm(torch.ones(1, 64), w.q, torch.ones(8, 4), torch.zeros(0), 4, 16)
    with pytest.raises(RuntimeError, match="fp32"):
        module.qgemm(torch.ones(1, 64, dtype=torch.float64), w.q, w.scales, w.offsets, 4, 32)


def test_zero_rows_give_an_empty_result(flavour: str):
    w = make_weight("int8", 8, 64)
    assert qgemm(torch.zeros(0, 64), w, flavour).shape == (0, 8)


@pytest.mark.parametrize("kind", ["q4g32", "q8g32"])
def test_a_non_finite_activation_makes_its_row_nan_and_spares_the_others(flavour: str, kind: str):
    w = make_weight(kind, 24, 128, seed=6)
    x = torch.randn(3, 128)
    clean = qgemm(x, w, flavour)
    x[1, 70] = float("nan")
    y = qgemm(x, w, flavour)
    assert torch.isnan(y[1]).all()
    assert torch.equal(y[0], clean[0]) and torch.equal(y[2], clean[2])
