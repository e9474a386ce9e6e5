"""`GroupLinear`: group-quantized weights (Pagoda's int4, or a GGUF file's blocks).

The buffers hold a `GroupWeights` exactly (the source of truth that is saved). Execution:
- fbgemm path (x86 CPU): the groups are re-rounded once onto a per-channel int8 grid, because
  fbgemm's dynamic linear has one scale per output row and cannot apply a scale per group. This
  costs one extra rounding of at most max|row|/254 per weight and one byte per weight of packed
  memory next to the 0.5-1 byte per weight of the groups (docs/quantization.md measures both).
- VNNI GEMV (x86 CPUs with AVX512-VNNI, 1-4 rows: decode, backend "auto"): reads the groups in
  place (0.5 byte per 4-bit weight plus fp32 scales/offsets), activations int8 per row; see
  `int8_ops.group_gemv`. Off the VNNI CPUs decode rows take the int8 GEMM path.
- AVX2 kernel (x86 CPU, 4-bit groups of 32 with offsets, at most `MAX_ROWS` rows: decode):
  reads the groups directly (0.75 byte per weight) without re-rounding; see `int4_kernel`.
  Off unless `enable_int4_kernel(model)` is called: its first use compiles C++, and on this
  CPU it measured slower than fbgemm's int8 at one row (docs/quantization.md).
- reference path (any device): dequantize the groups exactly and multiply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.quant import int4_kernel
from pagoda.quant.group_weights import GroupWeights, quantize_int4_groups
from pagoda.quant.int8_ops import group_gemv, group_gemv_supported
from pagoda.quant.kernels import use_fbgemm
from pagoda.quant.quant_linear import QuantLinear

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def fitting_group_size(in_features: int, group_size: int) -> int:
    """`group_size` halved until it divides in_features (SmolLM2's 576 admits 64, not 128)."""
    while in_features % group_size:
        group_size //= 2
    assert group_size >= 2, f"in_features {in_features} must be even for 4-bit packing"
    return group_size


class GroupLinear(QuantLinear):
    def __init__(self, weights: GroupWeights, method: str = "int4", backend: str = "auto",
                 reduce_range: bool = False, source: str = "", outlier_ratio: float = 5.0):
        out_features, in_features = weights.shape
        super().__init__(in_features, out_features, backend, reduce_range, outlier_ratio)
        self.method = method  # "int4" or "gguf"
        self.group_size, self.bits = weights.group_size, weights.bits
        self.source = source  # e.g. the GGUF block types it came from, for reports
        self.register_buffer("qweight", weights.qweight)
        self.register_buffer("scales", weights.scales)
        self.register_buffer("offsets", weights.offsets)
        self.use_kernel = False  # see enable_int4_kernel
        self._gemv_args: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._gemv_args = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.shape[0] <= int4_kernel.MAX_ROWS and use_fbgemm(x, self.backend):
            scales, offsets, _ = self.gemv_args()  # fp32 copies: 8 bytes per 32 weights
            y = int4_kernel.int4_group32_mm(x.float(), self.qweight, scales, offsets)
            return y.to(x.dtype)
        if (self.takes_decode_gemv(x)
                and group_gemv_supported(self.in_features, self.group_size, self.bits)):
            y = group_gemv(x, self.qweight, *self.gemv_args(), self.bits, self.group_size)
            return y.to(x.dtype)
        return super().forward(x)

    def gemv_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """fp32 scales and offsets (4 bytes each per group), for both decode kernels, and, for
        8-bit values, the shift `group_gemv` takes back out: 128 * sum_g scales[:, g] * (sum of
        group g's values)."""
        if self._gemv_args is None:
            scales = self.scales.float().contiguous()
            offsets = None if self.offsets is None else self.offsets.float().contiguous()
            shift = None
            if self.bits == 8:
                n, k = self.out_features, self.in_features
                sums = self.qweight.view(n, k // self.group_size, self.group_size).sum(
                    -1, dtype=torch.int32)
                shift = (128.0 * (scales.double() * sums.double()).sum(1)).float()
            self._gemv_args = (scales, offsets, shift)
        return self._gemv_args

    @property
    def weights(self) -> GroupWeights:
        return GroupWeights(self.qweight, self.scales, self.offsets, self.group_size, self.bits)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, backend: str = "auto",
                    reduce_range: bool = False, outlier_ratio: float = 5.0) -> GroupLinear:
        assert linear.bias is None, "the model contract has bias-free linears"
        group = fitting_group_size(linear.in_features, group_size)
        return cls(quantize_int4_groups(linear.weight.detach(), group), "int4", backend,
                   reduce_range, outlier_ratio=outlier_ratio)

    def spec(self) -> dict[str, Any]:
        scale_dtype = str(self.scales.dtype).removeprefix("torch.")
        return {**super().spec(), "group_size": self.group_size, "bits": self.bits,
                "scale_dtype": scale_dtype, "offsets": self.offsets is not None,
                "source": self.source}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], backend: str = "auto") -> GroupLinear:
        n, k, g, bits = spec["out_features"], spec["in_features"], spec["group_size"], spec["bits"]
        qweight = (torch.empty(n, k // 2, dtype=torch.uint8) if bits == 4
                   else torch.empty(n, k, dtype=torch.int8))
        scales = torch.empty(n, k // g, dtype=_DTYPES[spec["scale_dtype"]])
        offsets = torch.empty_like(scales) if spec["offsets"] else None
        return cls(GroupWeights(qweight, scales, offsets, g, bits), spec["method"], backend,
                   spec["reduce_range"], spec.get("source", ""), spec.get("outlier_ratio", 0.0))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weights.dequantize(dtype)

    def dequantize_columns(self, cols: torch.Tensor) -> torch.Tensor:
        return self.weights.dequantize_columns(cols)

    def int8_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights.to_int8_per_channel()

    def extra_repr(self) -> str:
        src = f", from {self.source}" if self.source else ""
        return f"{super().extra_repr()}, {self.bits}-bit, group {self.group_size}{src}"


def enable_int4_kernel(model: nn.Module) -> int:
    """Route decode rows of eligible 4-bit layers through the AVX2 kernel; returns how many."""
    if not int4_kernel.available():
        return 0
    eligible = [m for m in model.modules() if isinstance(m, GroupLinear) and m.bits == 4
                and m.group_size == int4_kernel.GROUP and m.offsets is not None]
    for m in eligible:
        m.use_kernel = True
    return len(eligible)
