"""`HalfLinear`: fp16 or bf16 weights (half the bytes of fp32), any activation dtype.

On x86 CPUs fp16 weights run through fbgemm's fp16-weight / fp32-compute linear. bf16 weights with
fp32 activations are widened per call (an fp32 product, as the activations ask for; a bf16 GEMM
would round them). With bf16 activations (`--dtype bf16`) the reference path multiplies in bf16,
which AMX / AVX512-BF16 CPUs run several times faster than fp32 (docs/quantization.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.quant.kernels import fbgemm_available, fp16_linear_fbgemm, pack_fp16
from pagoda.quant.quant_linear import Packed, QuantLinear

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfLinear(QuantLinear):
    def __init__(self, weight: torch.Tensor, backend: str = "auto"):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, backend)
        assert weight.dtype in HALF_DTYPES.values()
        self.register_buffer("weight", weight)  # (N, K)

    @property
    def method(self) -> str:  # type: ignore[override]
        return "fp16" if self.weight.dtype == torch.float16 else "bf16"

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, backend: str = "auto") -> HalfLinear:
        assert linear.bias is None, "the model contract has bias-free linears"
        return cls(linear.weight.detach().to(HALF_DTYPES[method]).clone(), backend)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], backend: str = "auto") -> HalfLinear:
        weight = torch.empty(spec["out_features"], spec["in_features"],
                             dtype=HALF_DTYPES[spec["method"]])
        return cls(weight, backend)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def pack(self, kernel: str) -> Packed:
        # bf16 has no fbgemm kernel: it is widened to fp32 at every call instead of keeping an
        # fp32 copy, which would make "bf16" cost 6 bytes per weight.
        if self.weight.dtype == torch.float16 and fbgemm_available():
            return Packed("fbgemm_fp16", pack_fp16(self.weight))
        return Packed("widen", None)

    def run_packed(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # half activations: multiply in their own dtype
            return torch.nn.functional.linear(x, self.weight)
        if packed.kernel == "widen":
            return torch.nn.functional.linear(x.float(), self.weight.float()).to(x.dtype)
        return fp16_linear_fbgemm(x, packed.weight)

    def packed_bytes(self) -> int:
        if self._packed is None or self._packed.kernel != "fbgemm_fp16":
            return 0
        return 2 * self.in_features * self.out_features
