"""Matmul kernels for quantized weights, and which one runs on which device.

Every quantized format runs on one of three paths (`int8_kernel` picks for "auto"):
- onednn (x86 CPUs with AMX int8 tiles): int8 weights with one scale per output row, packed once
  into oneDNN's blocked layout; activations arrive already quantized to int8, one scale per row
  (`int8_ops.quantize_rows`). On this Xeon its GEMM runs 2-3x faster than fbgemm's at 64-256 rows.
- fbgemm (other x86 CPUs): the same weights; fbgemm quantizes the activations itself, with one
  uint8 scale for the whole input. It runs 2-4x faster than fp32 on AVX2/AVX-512 cores, while
  torch's weight-only int8/int4 ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) reach
  only 2-4 GOP/s here.
- reference (any device, e.g. CUDA): dequantize the weight into the activation dtype and call
  `F.linear`. Correct everywhere, and the ground truth the packed paths are tested against.
docs/quantization.md has the kernel measurements behind these choices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F


@cache
def fbgemm_available() -> bool:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        q = torch.zeros(8, 8, dtype=torch.int8)
        pack_int8(q, torch.ones(8))
        return True
    except RuntimeError:
        return False


@cache
def fbgemm_exact() -> bool:
    """Whether fbgemm's int8 GEMM sums exactly on this CPU. Without AVX512-VNNI it multiplies u8
    activations by s8 weights with vpmaddubsw, which adds each pair into a saturating int16:
    255 * 127 * 2 = 64770 clips at 32767. Measured with exactly that product."""
    if not fbgemm_available():
        return False
    packed = pack_int8(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8))
    y = int8_linear_fbgemm(torch.ones(1, 64), packed, False)
    return abs(float(y[0, 0]) - 127.0 * 64) < 1.0


@cache
def onednn_int8_available() -> bool:
    """oneDNN's int8 linear, where the CPU has AMX int8 tiles (without them fbgemm is the faster
    int8 kernel, and the only one measured). Checked with two small products, one of them
    full-range (exact sums, not saturated ones)."""
    if not (torch.backends.mkldnn.is_available() and torch.cpu._is_amx_tile_supported()):
        return False
    try:
        w = pack_int8_onednn(torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8), torch.ones(2))
        y = int8_linear_onednn(torch.ones(1, 8, dtype=torch.int8), w)
        # full-range pairs: exact on AMX / VNNI; oneDNN capped below them (ONEDNN_MAX_CPU_ISA)
        # sums u8 x s8 pairs into saturating int16, like fbgemm without VNNI
        full = pack_int8_onednn(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8))
        z = int8_linear_onednn(torch.full((1, 64), 127, dtype=torch.int8), full)
    except RuntimeError:
        return False
    return y.tolist() == [[-36.0, 28.0]] and abs(float(z[0, 0]) - 127.0 * 127 * 64) < 1.0


def int8_kernel(device: torch.device, backend: str) -> str:
    """"onednn", "fbgemm" or "reference": the path int8-form weights take on `device`."""
    if device.type != "cpu" or backend == "reference":
        return "reference"
    if backend in ("auto", "onednn") and onednn_int8_available():
        return "onednn"
    if backend in ("auto", "fbgemm", "onednn") and fbgemm_available():
        return "fbgemm"
    return "reference"


@dataclass(frozen=True)
class OnednnWeight:
    """An (N, K) int8 weight in oneDNN's packed layout, with its per-row scales."""

    packed: torch.Tensor  # mkldnn-layout tensor, about one byte per weight
    scale: torch.Tensor  # (N,) fp32
    zero_points: torch.Tensor  # (N,) int64 zeros: symmetric weights


def pack_int8_onednn(qweight: torch.Tensor, scale: torch.Tensor) -> OnednnWeight:
    assert qweight.dtype == torch.int8 and qweight.dim() == 2
    n = qweight.shape[0]
    return OnednnWeight(torch.ops.onednn.qlinear_prepack(qweight.cpu().contiguous(), None),
                        scale.detach().float().cpu().contiguous(), torch.zeros(n, dtype=torch.long))


def int8_linear_onednn(q: torch.Tensor, weight: OnednnWeight) -> torch.Tensor:
    """q: (T, K) int8 activations (scale 1) -> (T, N) fp32 = q @ (qweight * scale).T."""
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 0, weight.packed, weight.scale, weight.zero_points, None, 1.0, 0,
        torch.float32, "none", [], "")


def pack_int8(qweight: torch.Tensor, scale: torch.Tensor) -> object:
    """fbgemm's packed form of `qweight * scale[:, None]` ((N, K) int8, (N,) scales).

    Built straight from the integers, without a float round trip. The packed object holds its own
    copy (about one byte per weight); torch's quantized-tensor constructors are deprecated but are
    the only way into these ops, hence the silenced warning.
    """
    assert qweight.dtype == torch.int8 and qweight.dim() == 2
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qt = torch._make_per_channel_quantized_tensor(
            qweight.cpu(), scale.detach().cpu().double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qt, None)


def int8_linear_fbgemm(x: torch.Tensor, packed: object, reduce_range: bool) -> torch.Tensor:
    """x: (T, K) any float dtype -> (T, N) in x's dtype."""
    y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, reduce_range)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def pack_fp16(weight: torch.Tensor) -> object:
    """fbgemm's fp16-weight, fp32-compute linear (half the weight bytes of fp32)."""
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float().cpu(), None)


def fp16_linear_fbgemm(x: torch.Tensor, packed: object) -> torch.Tensor:
    y = torch.ops.quantized.linear_dynamic_fp16(x.float().contiguous(), packed)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The portable path: `weight` is an already dequantized (N, K) matrix."""
    return F.linear(x, weight.to(device=x.device, dtype=x.dtype))
