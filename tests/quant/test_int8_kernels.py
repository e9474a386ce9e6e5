"""Quantized linears on each kernel: qgemm (auto), and the opt-in oneDNN (AMX) and fbgemm int8
libraries with their activation quantizer. Every path must agree with the exact product of the
dequantized weight within its activation rounding."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pagoda.kernels.igemm import igemm_torch
from pagoda.quant import int8_ops
from pagoda.quant.group_linear import GroupLinear
from pagoda.quant.int8_linear import Int8Linear
from pagoda.quant.kernels import fbgemm_exact, int8_kernel, onednn_int8_available

from .conftest import rel_err

CPU = torch.device("cpu")


def _linear(n: int, k: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = torch.randn(n, k) * 0.02
    return lin


def test_auto_takes_igemm_and_onednn_needs_amx():
    from pagoda.kernels import build

    # ONEDNN_MAX_CPU_ISA below AMX (how an AVX2 CPU is imitated on an AMX one) rules it out too
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in ("ALL", "DEFAULT") \
        and "AMX" not in os.environ["ONEDNN_MAX_CPU_ISA"].upper()
    assert onednn_int8_available() == (torch.cpu._is_amx_tile_supported() and not capped)
    m = Int8Linear.from_linear(_linear(64, 576))
    assert m.prepare().label == f"igemm-{build.best_flavour()}"
    # a K that is not a multiple of 32 has no whole activation blocks: wgemm takes any K
    assert Int8Linear.from_linear(_linear(64, 100)).prepare().label == \
        f"wgemm-{build.best_flavour()}"
    assert int8_kernel(CPU, "fbgemm") == "fbgemm"
    assert int8_kernel(CPU, "reference") == "reference"
    assert int8_kernel(torch.device("meta"), "auto") == "reference"


def _skip_unavailable(backend: str) -> None:
    if backend == "onednn" and not onednn_int8_available():
        pytest.skip("no AMX here (or oneDNN capped below it, whose int8 sums saturate): "
                    "'onednn' falls back to fbgemm, tested as such")
    if backend == "fbgemm" and not fbgemm_exact():
        pytest.skip("fbgemm's int8 GEMM on this CPU sums u8 x s8 pairs into saturating int16 "
                    "(vpmaddubsw, no AVX512-VNNI): it is opt-in only, and auto takes wgemm")


@pytest.mark.parametrize("backend", ["auto", "onednn", "fbgemm"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64])
def test_every_kernel_matches_the_dequantized_product(backend: str, rows: int):
    _skip_unavailable(backend)
    lin = _linear(300, 576)
    m = Int8Linear.from_linear(lin, backend=backend)
    x = torch.randn(rows, 576)
    exact = x @ m.dequantize().T
    err = rel_err(m(x), exact)
    assert 0 < err < 0.015, err  # activation rounding only: the weights are the same int8


def _rows_rounded(x: torch.Tensor) -> torch.Tensor:
    """x after the GEMVs' activation rounding: int8 per row, scale max|x| / 127."""
    mx = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.round(x * (mx.reciprocal() * 127.0)) * (mx / 127.0)


def test_onednn_and_fbgemm_agree_on_group_weights():
    _skip_unavailable("fbgemm")
    lin = _linear(256, 128, seed=1)
    x = torch.randn(16, 128)
    outs = [GroupLinear.from_linear(lin, 32, backend=b)(x) for b in ("onednn", "fbgemm")]
    exact = GroupLinear.from_linear(lin, 32, backend="reference")(x)
    for y in outs:
        assert rel_err(y, exact) < 0.02


def test_kernel_form_follows_a_backend_switch():
    lin = _linear(64, 64)
    m = Int8Linear.from_linear(lin, backend="fbgemm")
    x = torch.randn(8, 64)
    m(x)
    assert m._packed.kernel == "fbgemm"
    m.backend = "auto"
    m.invalidate()
    m(x)
    assert m.built_form("igemm") is not None and m.kernel_choice(CPU).kernel == "igemm"
    m.backend = "wgemm"
    m.invalidate()
    m(x)
    assert m.built_form("wgemm") is not None and m.kernel_choice(CPU).kernel == "wgemm"
    m.backend = "qgemm"
    m.invalidate()
    m(x)
    assert m.built_form("qgemm") is not None and m.kernel_choice(CPU).kernel == "qgemm"


@pytest.mark.parametrize("shape", [(1, 576), (64, 1536), (300, 40), (3, 7), (2048, 1024)])
@pytest.mark.parametrize("ratio", [0.0, 5.0])
@pytest.mark.parametrize("to_int8", [True, False])
def test_cpp_row_quantizer_equals_its_torch_twin_bit_for_bit(shape: tuple[int, int],
                                                             ratio: float, to_int8: bool):
    assert int8_ops.extension() is not None, "the C++ int8 helpers did not build"
    torch.manual_seed(2)
    # rows spread over magnitudes, so scales take many different values (2M elements at the
    # largest shape: one-ulp differences in the scale would show as mismatched codes)
    x = torch.randn(*shape) * torch.logspace(-3, 3, shape[0])[:, None]
    x[:, 5 % shape[1]] *= 40.0  # an outlier channel
    x[0, 2 % shape[1]] = 1e3  # and one huge value
    fast = int8_ops.quantize_rows(x, ratio, to_int8)
    twin = int8_ops.quantize_rows_torch(x, ratio, to_int8)
    for a, b in zip((fast.q, fast.scale, fast.cols, fast.x_cols),
                    (twin.q, twin.scale, twin.cols, twin.x_cols), strict=True):
        assert torch.equal(a, b)
    if ratio:
        assert 5 % shape[1] in fast.cols.tolist()


def test_row_quantizer_reconstructs_its_input():
    torch.manual_seed(3)
    x = torch.randn(16, 256)
    x[:, 9] = 500.0
    rows = int8_ops.quantize_rows(x, 5.0)
    assert rows.cols.tolist() == [9]
    recon = rows.q.float() * rows.scale
    recon[:, rows.cols] = rows.x_cols
    # every element within half a step of its own row's scale
    assert bool(((recon - x).abs() <= rows.scale / 2 + 1e-6).all())
    assert int(rows.q.abs().max()) == 127


def test_half_precision_warning_follows_the_measured_speed(monkeypatch: pytest.MonkeyPatch):
    from pagoda.quant import cli

    speeds = {"fp32": 200.0, "bf16": 900.0, "fp16": 0.4}  # an AMX-bf16 CPU without fp16 units
    monkeypatch.setattr(cli, "matmul_gflops", lambda dtype: speeds[dtype])
    assert cli.half_precision_warning("cpu", "bf16") is None
    warning = cli.half_precision_warning("cpu", "fp16")
    assert warning is not None and "0.4 GFLOP/s" in warning and "200.0" in warning
    assert cli.half_precision_warning("cuda", "fp16") is None
    assert cli.half_precision_warning("cpu", "fp32") is None


def test_matmul_probe_measures_something():
    from pagoda.quant.cli import matmul_gflops

    assert matmul_gflops("fp32", rows=8, k=64, n=64) > 0.01


def _group_weights_8bit(n: int, k: int, group: int, seed: int):
    from pagoda.quant.group_weights import GroupWeights

    torch.manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = (torch.rand(n, k // group) * 0.01 + 1e-3).half()
    return GroupWeights(q, scales, None, group, 8)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 33])
@pytest.mark.parametrize("kind", ["int4g32", "int4g64", "int4g256", "int8g32", "int8g16",
                                  "int8g32-offsets"])
def test_group_weights_are_read_in_place_by_qgemm(rows: int, kind: str):
    """GroupLinear under auto runs qgemm on its own buffers: exactly qgemm's arithmetic (block-
    rounded activations times the groups), close to the exact product."""
    from pagoda.kernels.qgemm import qgemm_torch

    k, group = 512, int(kind.split("g")[1].split("-")[0])
    if kind.startswith("int4"):
        from pagoda.quant.group_weights import quantize_int4_groups

        weights = quantize_int4_groups(_linear(192, k, seed=6).weight.detach(), group)
    else:
        weights = _group_weights_8bit(192, k, group, seed=6)
        if kind.endswith("offsets"):  # as when rows of mixed block types are concatenated
            weights.offsets = (torch.rand_like(weights.scales.float()) * 0.01).half()
    m = GroupLinear(weights, "gguf", backend="qgemm")
    x = torch.randn(rows, k)
    y = m(x)
    assert m.kernel_choice(CPU).kernel == "qgemm"
    assert m.built_form("qgemm").q is m.qweight, "the weights must be read in place, not copied"
    assert rel_err(y, qgemm_torch(x, m.built_form("qgemm"))) < 1e-5
    # asymmetric groups: the rounding error of x multiplies scales * q, larger than w itself
    assert rel_err(y, x @ m.dequantize().T) < (0.03 if weights.offsets is not None else 0.015)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 33])
@pytest.mark.parametrize("kind", ["int4g32", "int4g128", "int8g32", "int8g16", "int8g32-offsets"])
def test_group_weights_run_on_their_auto_kernel(rows: int, kind: str):
    """GroupLinear under auto: 4- and 8-bit groups of 32k run on igemm (activations rounded per
    32-block, as its torch twin computes them); other groups (8-bit groups of 16) multiply fp32
    activations by their dequantized weights (wgemm): the fp32 product of the same weights."""
    k, group = 512, int(kind.split("g")[1].split("-")[0])
    if kind.startswith("int4"):
        from pagoda.quant.group_weights import quantize_int4_groups

        weights = quantize_int4_groups(_linear(192, k, seed=6).weight.detach(), group)
    else:
        weights = _group_weights_8bit(192, k, group, seed=6)
        if kind.endswith("offsets"):
            weights.offsets = (torch.rand_like(weights.scales.float()) * 0.01).half()
    m = GroupLinear(weights, "gguf")
    x = torch.randn(rows, k)
    y = m(x)
    exact = x.double() @ m.dequantize().double().T
    if group % 32 == 0:
        assert m.kernel_choice(CPU).kernel == "igemm"
        assert rel_err(y, igemm_torch(x, m.built_form("igemm"))) < 1e-5
        assert rel_err(y.double(), exact) < 0.03  # the activations' rounding (offset part exact)
    else:
        assert m.kernel_choice(CPU).kernel == "wgemm"
        assert rel_err(y.double(), exact) < 1e-6


def test_qgemm_on_the_bundled_gguf_blocks(gguf_source):
    """Q4_1 (with offsets) and Q8_0 (the tied embedding / lm_head) blocks as the file has them."""
    torch.manual_seed(7)
    for name, kind in (("layers.3.mlp.down_proj", "down_proj"), ("lm_head", "lm_head")):
        weights, _ = gguf_source.weights_for(name, kind)
        m = GroupLinear(weights, "gguf")
        x = torch.randn(2, weights.shape[1])
        assert rel_err(m(x), x @ weights.dequantize().T) < 0.015
