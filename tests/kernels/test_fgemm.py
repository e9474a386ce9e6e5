"""fgemm, flavour by flavour: each output is the fma chain over k in increasing order (the stated
arithmetic, checked against an emulation of it), one result per row whatever its batch, and the
same bits from every ISA flavour this CPU runs; `PackedLinear` runs it as `--dense-kernel fgemm`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.kernels import build
from pagoda.kernels.fgemm import fgemm, pack, unpack
from pagoda.layers.dense_linear import (
    PackedLinear,
    onednn_available,
    pack_dense_linears,
    resolve_kernel,
)
from tests.kernels.helpers import assert_flavours_agree, assert_rows_batch_invariant, rel_err

# N not a multiple of 16 is padded; odd K; SmolLM2's shapes (K = 576 and the down proj's 1536)
SHAPES = [(40, 64), (17, 33), (96, 576), (33, 1536)]


def fma_chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[r, n] = fma(x[r, K-1], w[n, K-1], ... fma(x[r, 0], w[n, 0], 0)) in fp32: each product
    of two fp32 values is exact in fp64, and the sum is rounded once to fp32 per step (a double
    rounding could differ from a true fma in rare ties; these fixed inputs have none)."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    xd, wd = x.double(), w.double()
    for k in range(x.shape[1]):
        acc = (xd[:, k:k + 1] * wd[:, k] + acc.double()).float()
    return acc


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 12, 13, 40])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_flavour_computes_the_stated_fma_chain(flavour: str, shape, rows: int):
    n, k = shape
    torch.manual_seed(rows * 31 + k)
    w = torch.randn(n, k)
    x = torch.randn(rows, k) * torch.logspace(-2, 2, rows)[:, None]
    y = fgemm(x, pack(w), flavour)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert rel_err(y, x.double() @ w.double().T) < 1e-6
    if k <= 576:  # the emulation loops over k in Python
        assert torch.equal(y, fma_chain(x, w))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_row_gives_the_same_bits_in_every_batch(flavour: str, shape):
    """Ten rows (six with AVX2) make one tile whose width depends on its row count; more rows
    run in tiles, in chunks of tiles: the row's bits must not change."""
    n, k = shape
    w = pack(torch.randn(n, k, generator=torch.Generator().manual_seed(3)))
    assert_rows_batch_invariant(lambda x: fgemm(x, w, flavour), k)


def test_rows_across_chunks_of_tiles_keep_their_bits(flavour: str):
    """At K = 1536 a chunk holds a few tiles: rows of 1 to 130 cross several chunks."""
    torch.manual_seed(1)
    w = pack(torch.randn(70, 1536))
    x = torch.randn(130, 1536)
    full = fgemm(x, w, flavour)
    for r in (0, 11, 12, 35, 36, 37, 129):
        assert torch.equal(fgemm(x[r:r + 1], w, flavour)[0], full[r]), f"row {r}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_runnable_flavour_returns_the_same_bits(shape):
    flavours = build.runnable_flavours()
    if len(flavours) < 2:
        pytest.skip(f"this CPU runs only the {flavours} flavour: nothing to compare")
    n, k = shape
    w = pack(torch.randn(n, k, generator=torch.Generator().manual_seed(5)))
    assert_flavours_agree(lambda x, f: fgemm(x, w, f), flavours, k)


def test_pack_round_trips_and_bad_operands_are_refused(flavour: str):
    w = torch.randn(37, 64)
    p = pack(w)
    assert p.w.shape == (3, 64, 16) and torch.equal(unpack(p), w)
    module = build.load(flavour)
    with pytest.raises(RuntimeError, match="packed weights"):
        module.fgemm(torch.randn(2, 96), p.w, 37)  # K does not match
    with pytest.raises(RuntimeError, match="n exceeds"):
        module.fgemm(torch.randn(1, 64), p.w, 49)
    with pytest.raises(RuntimeError, match="fp32"):
        module.fgemm(torch.randn(1, 64).double(), p.w, 37)
    assert fgemm(torch.zeros(0, 64), p, flavour).shape == (0, 37)


def test_packed_linear_on_fgemm_is_the_linear(flavour: str, monkeypatch):
    monkeypatch.setattr(build, "native", lambda: build.load(flavour))
    assert resolve_kernel("fgemm") == "fgemm"
    torch.manual_seed(0)
    linear = nn.Linear(96, 50, bias=False)
    packed = PackedLinear.from_linear(linear, "fgemm")
    x = torch.randn(2, 7, 96)
    with torch.inference_mode():
        got, want = packed(x), linear(x)
    assert got.shape == want.shape == (2, 7, 50)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a replaced weight is packed again
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), 2 * want, rtol=1e-5, atol=1e-5)


def test_dense_kernel_choices_resolve(monkeypatch):
    assert resolve_kernel("torch") is None
    generic = build.load("generic")
    if generic is None:
        pytest.skip("the generic kernels did not build here")
    # only fgemm's portable build: auto prefers oneDNN (or torch), fgemm by name still runs it
    monkeypatch.setattr(build, "native", lambda: generic)
    assert resolve_kernel("auto") in ("onednn", None)
    assert resolve_kernel("fgemm") == "fgemm"
    monkeypatch.setattr(build, "native", lambda: None)
    with pytest.raises(RuntimeError, match="--dense-kernel fgemm"):
        resolve_kernel("fgemm")


def test_packing_again_follows_the_latest_choice():
    """A model shared by engines (an `LLM` built on a `LoadedModel` another engine prepared) runs
    its fp32 linears on the kernel the latest engine asked for, weights shared throughout."""
    if resolve_kernel("auto") != "fgemm":
        pytest.skip("fgemm's vector builds do not run here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48, bias=False), nn.Linear(48, 32, bias=False))
    weights = [m.weight for m in model]
    x = torch.randn(3, 32)
    with torch.inference_mode():
        want = model(x)
    kinds = {"fgemm": "fgemm", "torch": None}
    if onednn_available():
        kinds["onednn"] = "onednn"
    for choice, kernel in [*kinds.items(), ("fgemm", "fgemm")]:
        assert pack_dense_linears(model, choice) == (2 if kernel else 0)
        assert [getattr(m, "kernel", None) for m in model] == [kernel, kernel], choice
        assert all(m.weight is w for m, w in zip(model, weights, strict=True)), choice
        with torch.inference_mode():
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
