"""Each precision stays within a stated tolerance of fp32, on random and on real SmolLM2 weights.

Tolerances are relative Frobenius errors of a (64, K) @ W^T product, with a margin of about 1.5x
over what was measured when they were set (docs/quantization.md lists the measurements).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.quant.group_linear import GroupLinear
from pagoda.quant.half_linear import HalfLinear
from pagoda.quant.int8_linear import Int8Linear
from pagoda.quant.kernels import fbgemm_available, fbgemm_exact, onednn_int8_available

from .conftest import rel_err

# (method, group or option) -> tolerance on random N(0, 0.02^2) weights
RANDOM_TOL = {
    ("int8", "auto"): 0.015,  # qgemm: weight rounding + per-32-block int8 activation rounding
    ("int8", "onednn"): 0.02,  # weight rounding + per-token int8 activation rounding
    ("int8", "fbgemm"): 0.02,  # weight rounding + per-token uint8 activation rounding
    ("int8", "fbgemm-reduce-range"): 0.03,  # 7-bit activations: twice the activation error
    ("int8", "reference"): 0.012,  # weight rounding only
    ("int4", 32): 0.11,
    ("int4", 64): 0.13,
    ("fp16", None): 5e-4,
    ("bf16", None): 4e-3,
}


# The batched int8 kernels this CPU has (oneDNN needs AMX).
PACKED_BACKENDS = ("onednn", "fbgemm") if onednn_int8_available() else ("fbgemm",)


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    return lin


def _build(key: tuple[str, object], lin: nn.Linear) -> nn.Module:
    method, opt = key
    if method == "int8":
        backend = "fbgemm" if opt == "fbgemm-reduce-range" else str(opt)
        return Int8Linear.from_linear(lin, backend=backend,
                                      reduce_range=opt == "fbgemm-reduce-range")
    if method == "int4":
        return GroupLinear.from_linear(lin, group_size=int(opt))
    return HalfLinear.from_linear(lin, method)


def test_fbgemm_is_available_on_this_x86_cpu():
    # Without it every CPU run silently takes the slow reference path.
    assert fbgemm_available()


@pytest.mark.parametrize("key", list(RANDOM_TOL), ids=lambda k: f"{k[0]}-{k[1]}")
def test_random_weights_within_tolerance(key: tuple[str, object]):
    if key[1] == "onednn" and not onednn_int8_available():
        pytest.skip("no AMX here: 'onednn' would fall back to fbgemm, tested as such")
    if str(key[1]) == "fbgemm" and not fbgemm_exact():
        pytest.skip("fbgemm's int8 GEMM saturates int16 pair sums on this CPU (no VNNI): "
                    "opt-in only, auto takes wgemm")
    torch.manual_seed(0)
    lin = _linear(torch.randn(768, 576) * 0.02)
    x = torch.randn(64, 576)
    err = rel_err(_build(key, lin)(x), lin(x))
    assert err < RANDOM_TOL[key], err
    assert err > 0  # a quantizer that changes nothing is not quantizing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_follows_input_on_both_paths(dtype: torch.dtype):
    lin = _linear(torch.randn(32, 64))
    for backend in ("auto", "reference"):
        m = Int8Linear.from_linear(lin, backend=backend)
        y = m(torch.randn(3, 64).to(dtype))
        assert y.dtype == dtype and y.shape == (3, 32)


@pytest.mark.parametrize("backend", ["auto", "fbgemm"])
def test_packed_and_reference_paths_agree(backend: str):
    if backend == "fbgemm" and not fbgemm_exact():
        pytest.skip("fbgemm's int8 GEMM saturates int16 pair sums on this CPU (no VNNI)")
    torch.manual_seed(1)
    lin = _linear(torch.randn(256, 128) * 0.02)
    x = torch.randn(16, 128)
    for m in (Int8Linear.from_linear(lin, backend=backend),
              GroupLinear.from_linear(lin, 32, backend=backend)):
        fast = m(x)
        m.backend = "reference"
        assert rel_err(fast, m(x)) < 0.02


def test_real_gguf_weights(gguf_source):
    """gguf keeps the file's blocks: the reference path is exact, fbgemm adds int8 rounding.
    int8 and int4 re-quantize the (dequantized) file weights and must stay close to them."""
    torch.manual_seed(2)
    for name, kind in (("layers.12.self_attn.qkv_proj", "qkv_proj"),
                       ("layers.12.mlp.down_proj", "down_proj")):
        weights, _ = gguf_source.weights_for(name, kind)
        exact = weights.dequantize()
        lin = _linear(exact)
        x = torch.randn(64, exact.shape[1])
        ref = lin(x)
        native = GroupLinear(weights, "gguf", backend="reference")
        assert rel_err(native(x), ref) < 1e-5
        native.backend = "auto"
        assert rel_err(native(x), ref) < 0.025
        assert rel_err(Int8Linear.from_linear(lin)(x), ref) < 0.025
        assert rel_err(GroupLinear.from_linear(lin, 64)(x), ref) < 0.15


def test_one_huge_token_does_not_flatten_the_others():
    """SmolLM2's first token in down_proj reaches ~2000x the typical row. Activations get one
    scale per token (quantized per row for oneDNN; normalised before fbgemm's per-tensor
    quantization), so the other tokens keep their precision even without the column split."""
    torch.manual_seed(3)
    lin = _linear(torch.randn(256, 512) * 0.02)
    x = torch.randn(32, 512)
    x[0, 17] = 2000.0
    ref = lin(x)
    others = slice(1, None)  # the rows without the outlier
    for ratio in (0.0, 5.0):
        for backend in PACKED_BACKENDS:
            m = Int8Linear.from_linear(lin, backend=backend, outlier_ratio=ratio)
            assert rel_err(m(x)[others], ref[others]) < 0.03
    group = GroupLinear.from_linear(lin, 32, outlier_ratio=5.0)
    exact = GroupLinear.from_linear(lin, 32, backend="reference")
    assert rel_err(group(x)[others], exact(x)[others]) < 0.03


def test_outlier_channels_are_multiplied_exactly():
    """A feature dimension that is large in every token (LLMs' systematic outlier channels)
    would set every row's scale; the split multiplies it in fp32 and keeps the rest precise."""
    torch.manual_seed(5)
    lin = _linear(torch.randn(256, 512) * 0.02)
    x = torch.randn(32, 512)
    x[:, 17] = 300.0
    ref = lin(x)
    for backend in PACKED_BACKENDS:
        split = Int8Linear.from_linear(lin, backend=backend, outlier_ratio=5.0)
        plain = Int8Linear.from_linear(lin, backend=backend, outlier_ratio=0.0)
        assert rel_err(split(x), ref) < 0.01
        assert rel_err(plain(x), ref) > 3 * rel_err(split(x), ref)


def test_dequantize_columns_matches_full_dequantization():
    torch.manual_seed(4)
    lin = _linear(torch.randn(40, 128))
    cols = torch.tensor([0, 1, 31, 32, 77, 127])
    for m in (Int8Linear.from_linear(lin), GroupLinear.from_linear(lin, 32)):
        assert torch.equal(m.dequantize_columns(cols), m.dequantize()[:, cols])


def test_outlier_rows_cache_serves_changing_and_oversized_column_sets():
    """The per-column cache of outlier weight rows must give the same product as dequantizing
    afresh, when the outlier set changes between calls and when it exceeds the cache."""
    from pagoda.quant.quant_linear import OUTLIER_ROWS

    torch.manual_seed(6)
    lin = _linear(torch.randn(64, 2 * OUTLIER_ROWS + 64) * 0.02)
    m = Int8Linear.from_linear(lin, backend="fbgemm", outlier_ratio=5.0)
    for spikes in ([3, 17], [17, 40], list(range(OUTLIER_ROWS + 8)), [3, 17]):
        x = torch.randn(8, lin.in_features)
        x[:, spikes] = 200.0
        ref = x @ m.dequantize().T
        assert rel_err(m(x), ref) < 0.01
        assert len(m._outlier_rows) <= OUTLIER_ROWS
