"""The activation quantizer of the fbgemm/oneDNN int8 paths, a C++ kernel with a torch twin.

`quantize_rows`: per-token (row) int8 quantization of a linear layer's input, the activation half
of kernels that take int8 activations (oneDNN's `qlinear_pointwise`), or rows normalised to
max |x| = 1 for fbgemm's per-tensor quantizer. LLM.int8()-style outlier columns (largest |x|
above `outlier_ratio` times the median column's) are taken out for an exact fp32 product; that
split depends on the batch. Kernel (`kernels/csrc/quantize_rows.cpp`) and twin return the same
`QuantizedRows`, bit for bit. Without the C++ build the twin runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pagoda.kernels import build


@dataclass(frozen=True)
class QuantizedRows:
    """x ~= q * scale with the outlier columns zeroed in q, plus x[:, cols] kept exactly."""

    q: torch.Tensor  # (M, K) int8 in [-127, 127] (or fp32 in [-1, 1] when not to_int8)
    scale: torch.Tensor  # (M, 1) fp32, max |x| over the row's non-outlier columns / 127 (or / 1)
    cols: torch.Tensor  # (n,) int64 outlier columns, ascending
    x_cols: torch.Tensor  # (M, n) fp32


def extension() -> Any | None:
    return build.native()


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
