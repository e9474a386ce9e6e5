"""`wgemm`: fp32 activations times 4/8-bit group-quantized weights, computed in fp32.

    w[n, k] = scales[n, t] * q[n, k] + offsets[n, t]                      (t = k // g)
    y[r, n] = sum over groups t of  scales[n, t] * P[r, n, t] + offsets[n, t] * X[r, t]
    P[r, n, t] = sum over k in group t of x[r, k] * q[n, k];  X[r, t] = sum of those x[r, k]

The integers are widened to fp32 in registers and the activations are never rounded (weight-only
quantization): at one row the kernel streams the stored 4/8 bits per weight like `qgemm`, at many
rows it runs an fp32 GEMM's inner loop (one broadcast fma per 8/16 products) on a panel widened
once, where qgemm pays a conversion per 32-block of every (row, output). Every output is computed
by the same operations in the same order whatever the batch, path, tile or ISA flavour
(`csrc/wgemm.cpp` states them), so the result of a row does not depend on its batch, and every
flavour returns the same bits.

The kernel reads a transposed copy of the stored integers (`pack`): blocks of 16 outputs whose
values at one k sit side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kernels import build
from pagoda.kernels.qgemm import QGemmWeight, int4_values

OUT_BLOCK = 16  # outputs per packed block
_NO_OFFSETS = torch.zeros(0)


@dataclass(frozen=True)
class WGemmWeight:
    """A `QGemmWeight` transposed into blocks of 16 outputs (N padded with zero weights)."""

    q: torch.Tensor  # (N/16, K/2 or K, 16) uint8 (4-bit: bytes of two k) or int8
    scales: torch.Tensor  # (N/16, K/g, 16) fp32, or fp16 (see `pack`)
    offsets: torch.Tensor  # (N/16, K/g, 16) like the scales, or empty: no offsets
    out_features: int
    bits: int
    group: int


def shape_supported(k: int, group: int, bits: int) -> bool:
    """Any K with groups dividing it (even groups for 4 bits, whose bytes hold two k)."""
    return k > 0 and group > 0 and k % group == 0 and (bits == 8 or group % 2 == 0)


def blocks_of(t: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, C) -> (N/16, C, 16) with `pad` zero rows added first."""
    if pad:
        t = torch.cat([t, t.new_zeros(pad, t.shape[1])])
    return t.reshape(-1, OUT_BLOCK, t.shape[1]).transpose(1, 2).contiguous()


def rows_of(t: torch.Tensor, n: int) -> torch.Tensor:
    """(N/16, C, 16) -> the first n rows of (N, C): `blocks_of` undone."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def exact_in_half(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.equal(t.float().half().float(), t.float()))


def pack(w: QGemmWeight) -> WGemmWeight:
    """The kernel's layout of `w` (a copy: the stored integers stay as they are). Scales and
    offsets are kept in fp16 when every one of them is exactly an fp16 (GGUF blocks' own scales):
    a quarter fewer bytes per 4-bit weight to stream, the same values once widened."""
    n = w.q.shape[0]
    pad = -n % OUT_BLOCK
    dtype = (torch.float16 if exact_in_half(w.scales) and exact_in_half(w.offsets)
             else torch.float32)
    return WGemmWeight(q=blocks_of(w.q, pad), scales=blocks_of(w.scales.to(dtype), pad),
                       offsets=(_NO_OFFSETS.to(dtype) if w.offsets is None
                                else blocks_of(w.offsets.to(dtype), pad)),
                       out_features=n, bits=w.bits, group=w.group)


def dequantize(w: WGemmWeight) -> torch.Tensor:
    """The (N, K) weights `scales * q + offsets`, rounded once to fp32."""
    q = rows_of(w.q, w.out_features)
    vals = (int4_values(q) if w.bits == 4 else q.view(torch.int8)).float()
    scales = rows_of(w.scales.float(), w.out_features).repeat_interleave(w.group, dim=1)
    offsets = (rows_of(w.offsets.float(), w.out_features).repeat_interleave(w.group, dim=1)
               if w.offsets.numel() else torch.zeros_like(scales))
    return (vals.double() * scales.double() + offsets.double()).float()


def wgemm_torch(x: torch.Tensor, w: WGemmWeight) -> torch.Tensor:
    """The product with the dequantized weights in torch ops (any device): equal to the
    kernel's up to fp32 rounding and summation order."""
    return x.float() @ dequantize(w).to(x.device).T


def wgemm(x: torch.Tensor, w: WGemmWeight, flavour: str | None = None) -> torch.Tensor:
    """x (M, K) any float dtype -> (M, N) fp32. `flavour` picks a build (default: the best this
    CPU runs); without a built kernel, or off the CPU, the torch reference runs."""
    module = build.module_for(x.device.type, flavour)
    if module is None:
        return wgemm_torch(x, w)
    return module.wgemm(x.float().contiguous(), w.q, w.scales, w.offsets, w.out_features,
                        w.bits, w.group)
