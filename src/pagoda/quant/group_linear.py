"""`GroupLinear`: group-quantized weights (Pagoda's int4, or a GGUF file's blocks).

The buffers hold a `GroupWeights` exactly (the source of truth that is saved). On the CPU qgemm
reads the 4-bit nibbles or 8-bit values in place for every row count (`kernel_plan.py`); forced
fbgemm/oneDNN re-round the groups once onto a per-channel int8 grid (one scale per output row is
all those kernels take), and the reference path dequantizes exactly and multiplies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.kernels.qgemm import QGemmWeight
from pagoda.quant.group_weights import GroupWeights, quantize_int4_groups
from pagoda.quant.kernel_plan import WeightFormat
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

    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.method, self.bits, self.group_size, self.in_features)

    def make_qgemm_weight(self) -> QGemmWeight:
        offsets = None if self.offsets is None else self.offsets.float().contiguous()
        return QGemmWeight(self.qweight, self.scales.float().contiguous(), offsets, self.bits,
                           self.group_size)

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

