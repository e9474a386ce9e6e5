"""`Int8Linear`: symmetric int8 weights with one fp32 scale per output channel.

To qgemm this is one 8-bit group spanning the whole row (group = K), read in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.kernels.qgemm import QGemmWeight
from pagoda.quant.group_weights import quantize_int8_per_channel
from pagoda.quant.kernel_plan import WeightFormat
from pagoda.quant.quant_linear import QuantLinear


class Int8Linear(QuantLinear):
    method = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, backend: str = "auto",
                 reduce_range: bool = False, outlier_ratio: float = 5.0):
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features, backend, reduce_range, outlier_ratio)
        assert qweight.dtype == torch.int8 and scale.shape == (out_features,)
        self.register_buffer("qweight", qweight)  # (N, K) int8 in -127..127
        self.register_buffer("scale", scale.float())  # (N,) fp32

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", reduce_range: bool = False,
                    outlier_ratio: float = 5.0) -> Int8Linear:
        assert linear.bias is None, "the model contract has bias-free linears"
        q, scale = quantize_int8_per_channel(linear.weight.detach())
        return cls(q, scale, backend, reduce_range, outlier_ratio)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], backend: str = "auto") -> Int8Linear:
        n, k = spec["out_features"], spec["in_features"]
        return cls(torch.empty(n, k, dtype=torch.int8), torch.empty(n), backend,
                   spec["reduce_range"], spec.get("outlier_ratio", 0.0))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def dequantize_columns(self, cols: torch.Tensor) -> torch.Tensor:
        return self.qweight[:, cols].float() * self.scale[:, None]

    def int8_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qweight, self.scale

    def weight_format(self) -> WeightFormat:
        return WeightFormat("int8", 8, self.in_features, self.in_features)

    def make_qgemm_weight(self) -> QGemmWeight:
        return QGemmWeight(self.qweight, self.scale.view(-1, 1), None, 8, self.in_features)
