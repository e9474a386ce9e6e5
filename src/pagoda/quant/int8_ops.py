"""CPU helpers of the int8 linears, each a C++ kernel (`csrc/int8_ops.cpp`) with a torch twin.

- `quantize_rows`: per-token (row) int8 quantization of a linear layer's input, the activation
  half of kernels that take int8 activations (oneDNN's `qlinear_pointwise`). One scale per row,
  so a token's rounding never depends on the other tokens of its batch, and LLM.int8()-style
  outlier columns (largest |x| above `outlier_ratio` times the median column's) taken out for an
  exact fp32 product. Kernel and twin return the same `QuantizedRows`, bit for bit.
- `int8_gemv`: int8 weights times 1-4 rows (decode), streaming each weight byte once. oneDNN's
  call costs ~40 us however small the input, more than a 960x576 weight takes to stream. It
  reads the stored weight, not the GEMM library's packed copy.
- `group_gemv`: the same for group-quantized weights (4-bit nibbles or 8-bit values with a scale
  and offset per group: int4, GGUF's Q4_1/Q8_0/...), read in place at 0.5-1 byte per weight.

The kernels are built on first use (`native_build`); without them the torch twins run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from pagoda.layers.native_build import load_native

SOURCES = (Path(__file__).parent / "csrc" / "int8_ops.cpp",
           Path(__file__).parent / "csrc" / "group_gemv.cpp")
GEMV_MAX_ROWS = 4


@dataclass(frozen=True)
class QuantizedRows:
    """x ~= q * scale with the outlier columns zeroed in q, plus x[:, cols] kept exactly."""

    q: torch.Tensor  # (M, K) int8 in [-127, 127] (or fp32 in [-1, 1] when not to_int8)
    scale: torch.Tensor  # (M, 1) fp32, max |x| over the row's non-outlier columns / 127 (or / 1)
    cols: torch.Tensor  # (n,) int64 outlier columns, ascending
    x_cols: torch.Tensor  # (M, n) fp32


def extension() -> Any | None:
    return load_native("int8_ops", SOURCES, "the C++ int8 helpers")


def quantize_rows_torch(x: torch.Tensor, outlier_ratio: float,
                        to_int8: bool = True) -> QuantizedRows:
    """The reference semantics, in torch ops (any device)."""
    x = x.float()
    cols = torch.zeros(0, dtype=torch.long, device=x.device)
    if outlier_ratio > 0 and x.numel():
        col_max = x.abs().amax(dim=0)
        cols = torch.nonzero(col_max > outlier_ratio * col_max.median()).flatten()
    x_cols = x[:, cols]
    kept = x.index_fill(1, cols, 0.0)
    row_max = kept.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    if not to_int8:
        return QuantizedRows(kept * row_max.reciprocal(), row_max, cols, x_cols)
    q = torch.round(kept * (row_max.reciprocal() * 127.0)).clamp_(-127, 127).to(torch.int8)
    return QuantizedRows(q, row_max / 127.0, cols, x_cols)


def quantize_rows(x: torch.Tensor, outlier_ratio: float, to_int8: bool = True) -> QuantizedRows:
    """x (M, K) in any float dtype; the fused kernel on CPU when it is built.

    `to_int8=False` stops before rounding: q is then the fp32 rows scaled to max |q| = 1 and
    scale their max |x|, the input a kernel that quantizes per tensor (fbgemm) needs to
    quantize each row with its own scale."""
    module = extension() if x.device.type == "cpu" else None
    if module is None:
        return quantize_rows_torch(x, outlier_ratio, to_int8)
    return QuantizedRows(*module.quantize_rows(x.float().contiguous(), float(outlier_ratio),
                                               to_int8))


def int8_gemv_torch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() @ (qweight.float() * scale[:, None]).T


@cache
def fast_gemv_available() -> bool:
    """Whether `int8_gemv` runs the VNNI kernel, which beats the GEMM libraries at 1-4 rows
    (without VNNI the widening kernel is slower than fbgemm for large weights). Asked on every
    decode call, so answered once."""
    module = extension()
    return module is not None and module.has_vnni()


@cache
def _group_gemv_built() -> bool:
    module = extension()
    return module is not None and module.group_gemv_available()


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              row_sums: torch.Tensor) -> torch.Tensor:
    """x (M <= GEMV_MAX_ROWS, K) any float dtype, qweight (N, K) int8, scale (N,) fp32,
    row_sums (N,) int32 = qweight.sum(1) -> (M, N) fp32 ~= x @ (qweight * scale[:, None]).T.

    On CPUs with AVX512-VNNI each row of x is quantized to int8 with its own scale (as the
    batched kernels do); elsewhere x stays fp32."""
    module = extension() if x.device.type == "cpu" else None
    if module is None:
        return int8_gemv_torch(x, qweight, scale)
    return module.int8_gemv(x.float().contiguous(), qweight, scale, row_sums)


def group_gemv_supported(k: int, group: int, bits: int) -> bool:
    """Whether `group_gemv` runs here for this shape (VNNI build, 64-element chunks, each int32
    lane inside one group: 8 consecutive elements for 4-bit, 4 for 8-bit)."""
    return (_group_gemv_built() and k % 64 == 0
            and group >= (8 if bits == 4 else 4) and (64 % group == 0 or group % 64 == 0))


def group_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offsets: torch.Tensor | None, shift: torch.Tensor | None, bits: int,
               group: int) -> torch.Tensor:
    """x (M <= GEMV_MAX_ROWS, K) -> (M, N) fp32 ~= x @ w.T with w = scales * q + offsets per
    group (fp32 scales/offsets (N, K/group)); 8-bit weights need `shift` = 128 * sum over groups
    of scales * (sum of the group's q), per row. Check `group_gemv_supported` first."""
    module = extension()
    assert module is not None
    empty = torch.zeros(0)
    return module.group_gemv(x.float().contiguous(), qweight, scales,
                             empty if offsets is None else offsets,
                             empty if shift is None else shift, bits, group)
