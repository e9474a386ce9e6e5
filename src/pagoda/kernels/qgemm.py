"""`qgemm`: fp32 activations times 4/8-bit group-quantized weights, for every row count.

    w[n, k] = scales[n, k // g] * q[n, k] + offsets[n, k // g]

Activations are rounded per row in blocks of 32 (Q8_0-style: one scale max|x|/127 per block),
the integer dot products are exact, and each output is accumulated in an order that does not
depend on the other rows of the call: a token's result is the same alone or in any batch.
`csrc/qgemm.cpp` states the arithmetic; `qgemm_torch` is its reference in torch ops (any device),
equal to the kernels up to fp32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kernels import build

BLOCK = 32
_NO_OFFSETS = torch.zeros(0)  # what the C++ takes for "no offsets"


@dataclass(frozen=True)
class QGemmWeight:
    """A weight in the form the kernel reads: the stored values in place, fp32 scales/offsets."""

    q: torch.Tensor  # (N, K/2) uint8 nibbles (4-bit) or (N, K) int8 (8-bit)
    scales: torch.Tensor  # (N, K/g) fp32
    offsets: torch.Tensor | None  # (N, K/g) fp32 or None
    bits: int
    group: int

    @property
    def in_features(self) -> int:
        return self.q.shape[1] * (2 if self.bits == 4 else 1)


def shape_supported(k: int, group: int, bits: int) -> bool:
    """K a multiple of 32; 4-bit groups multiples of 32 dividing K; 8-bit also groups of 16."""
    if k <= 0 or k % BLOCK or group <= 0 or k % group:
        return False
    if bits == 4:
        return group % BLOCK == 0
    return bits == 8 and (group == 16 or group % BLOCK == 0)


def quantize_blocks_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> int8 values (M, K) and block scales (M, K/32), as the kernels round them."""
    m, k = x.shape
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    mx = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(mx > 0, mx.reciprocal() * 127.0, torch.zeros_like(mx))
    q = torch.round(xb * inv).to(torch.int8).reshape(m, k)
    return q, (mx / 127.0).reshape(m, k // BLOCK)


def int4_values(q: torch.Tensor) -> torch.Tensor:
    """(N, B) bytes of 4-bit pairs -> (N, 2B) integers 0..15 (element 2i: low nibble of byte i)."""
    return torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(q.shape[0], -1)


def dequantize(w: QGemmWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale part, offset part) of the weight in fp32, each (N, K)."""
    vals = int4_values(w.q) if w.bits == 4 else w.q
    scale = w.scales.repeat_interleave(w.group, dim=1)
    offset = None if w.offsets is None else w.offsets.repeat_interleave(w.group, dim=1)
    return vals.float() * scale, offset


def qgemm_torch(x: torch.Tensor, w: QGemmWeight) -> torch.Tensor:
    """The kernels' arithmetic in torch ops: block-rounded x times the scale part, plus exact x
    times the offset part."""
    q, d = quantize_blocks_torch(x)
    xr = (q.float().reshape(q.shape[0], -1, BLOCK) * d[..., None]).reshape(x.shape)
    scale_part, offset_part = dequantize(w)
    y = xr @ scale_part.T
    if offset_part is not None:
        y = y + x.float() @ offset_part.T
    return y


def qgemm(x: torch.Tensor, w: QGemmWeight, flavour: str | None = None) -> torch.Tensor:
    """x (M, K) any float dtype -> (M, N) fp32. `flavour` picks a build (default: the best this
    CPU runs); without a built kernel, or off the CPU, the torch reference runs."""
    module = build.module_for(x.device.type, flavour)
    if module is None:
        return qgemm_torch(x, w)
    return module.qgemm(x.float().contiguous(), w.q, w.scales,
                        _NO_OFFSETS if w.offsets is None else w.offsets, w.bits, w.group)
