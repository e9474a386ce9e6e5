"""Matmul kernels for quantized weights, and which one runs on which device.

Two paths exist for every quantized format:
- fbgemm (x86 CPUs): int8 weights with one scale per output row, packed once; activations are
  quantized per call to uint8 with one scale for the whole input (dynamic quantization). It runs
  3-10x faster than fp32 on this machine's AVX2 cores, while torch's weight-only int8/int4 ops
  (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) reach only 2-4 GOP/s here.
- reference (any device, e.g. CUDA): dequantize the weight into the activation dtype and call
  `F.linear`. Correct everywhere, and the ground truth the fbgemm path is tested against.
"""

from __future__ import annotations

import warnings
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


def use_fbgemm(x: torch.Tensor, backend: str) -> bool:
    """The fbgemm path runs on CPU tensors unless the reference path is forced."""
    return backend == "auto" and x.device.type == "cpu" and fbgemm_available()


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
