"""`igemm`: fp32 activations times 4- or 8-bit group-quantized weights as an integer GEMM.

    w[n, k] = scales[n, t] * q[n, k] + offsets[n, t]                      (t = k // g)
    y[r, n] = sum over 32-blocks b of  scales[n, t(b)] * d[r, b] * I[r, n, b]
              + sum over groups t of offsets[n, t] * X[r, t]

Each row of x is rounded to int8 per 32-element block (llama.cpp's Q8_0 rounding, the same as
`qgemm`'s: d = max|x| / 127), I is the exact integer dot product of a block with the weights'
integers, X the fp32 sum of x over a group (in one fixed order). Where wgemm runs an fp32 fma per
product, this runs 64 products per AVX512-VNNI instruction (4-bit: 32 per AVX2 `vpmaddubsw`;
8-bit: 16 per `vpmaddwd`) and pays a conversion only per (row, output, block). Every output is
computed by the same operations in the same order whatever the batch, tile or ISA flavour
(`csrc/igemm.cpp`, `csrc/igemm8.cpp`): a row's result does not depend on its batch, and every
flavour returns the same bits.

The kernel reads a repacked copy of the integers (`pack`), in blocks of 16 outputs. 4-bit: per
block and octet of k, each output's 8 values in 4 bytes (k .. k+3 in the low nibbles, k+4 .. k+7
in the high ones), so a 32-bit lane meets 4 consecutive activation bytes. 8-bit: per block and
pair of k, each output's 2 signed bytes, widened to int16 in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kernels import build
from pagoda.kernels.qgemm import BLOCK, QGemmWeight, int4_values, quantize_blocks_torch
from pagoda.kernels.wgemm import OUT_BLOCK, blocks_of, exact_in_half, rows_of

_NO_OFFSETS = torch.zeros(0)


@dataclass(frozen=True)
class IGemmWeight:
    """A 4- or 8-bit `QGemmWeight` repacked in blocks of 16 outputs (N padded with zeros)."""

    q: torch.Tensor  # 4-bit: (N/16, K/8, 64) uint8; 8-bit: (N/16, K/2, 32) int8
    scales: torch.Tensor  # (N/16, K/g, 16) fp32, or fp16 when all are exact in fp16
    offsets: torch.Tensor  # like the scales, or empty: no offsets
    out_features: int
    group: int
    bits: int = 4


def shape_supported(k: int, group: int, bits: int) -> bool:
    """4- or 8-bit weights whose groups are multiples of 32 dividing K (GGUF Q4_0/Q4_1/Q4_K/
    Q8_0, int4, int8 per channel)."""
    return bits in (4, 8) and k > 0 and group > 0 and group % BLOCK == 0 and k % group == 0


def pack(w: QGemmWeight) -> IGemmWeight:
    """The kernel's layout of the 4- or 8-bit weight `w` (a copy)."""
    if not shape_supported(w.in_features, w.group, w.bits):
        raise ValueError(f"igemm takes 4- or 8-bit groups of a multiple of 32 dividing K, not "
                         f"{w.bits}-bit groups of {w.group} with K={w.in_features}")
    n, k = w.q.shape[0], w.in_features
    pad = -n % OUT_BLOCK
    vals = int4_values(w.q) if w.bits == 4 else w.q.view(torch.int8)
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad, k)])
    if w.bits == 4:
        # (N/16, 16, K/8, [low 4 | high 4]) -> bytes low | high << 4 -> (N/16, K/8, 16 x 4)
        octets = vals.reshape(-1, OUT_BLOCK, k // 8, 2, 4)
        packed = (octets[:, :, :, 0] | (octets[:, :, :, 1] << 4)).transpose(1, 2)
        packed = packed.reshape(-1, k // 8, 4 * OUT_BLOCK)
    else:  # (N/16, 16, K/2, 2) -> (N/16, K/2, 16 x 2)
        packed = vals.reshape(-1, OUT_BLOCK, k // 2, 2).transpose(1, 2)
        packed = packed.reshape(-1, k // 2, 2 * OUT_BLOCK)
    dtype = (torch.float16 if exact_in_half(w.scales) and exact_in_half(w.offsets)
             else torch.float32)
    return IGemmWeight(q=packed.contiguous(),
                       scales=blocks_of(w.scales.to(dtype), pad),
                       offsets=(_NO_OFFSETS.to(dtype) if w.offsets is None
                                else blocks_of(w.offsets.to(dtype), pad)),
                       out_features=n, group=w.group, bits=w.bits)


def values(w: IGemmWeight) -> torch.Tensor:
    """The (N, K) integers (0..15, or -128..127) of a packed weight (the inverse of `pack`)."""
    if w.bits == 8:
        b, pairs, _ = w.q.shape
        q = w.q.reshape(b, pairs, OUT_BLOCK, 2).transpose(1, 2)  # (N/16, 16, K/2, 2)
        return q.reshape(b * OUT_BLOCK, pairs * 2)[: w.out_features]
    b, octets, _ = w.q.shape
    q = w.q.reshape(b, octets, OUT_BLOCK, 4).transpose(1, 2)  # (N/16, 16, K/8, 4)
    vals = torch.stack((q & 0x0F, q >> 4), dim=3)  # (N/16, 16, K/8, 2, 4)
    return vals.reshape(b * OUT_BLOCK, octets * 8)[: w.out_features]


def igemm_torch(x: torch.Tensor, w: IGemmWeight) -> torch.Tensor:
    """The kernel's arithmetic in torch ops (any device): block-rounded x times the scale part,
    exact x times the offset part; equal to the kernel's up to fp32 rounding and order."""
    q, d = quantize_blocks_torch(x)
    xr = (q.float().reshape(q.shape[0], -1, BLOCK) * d[..., None]).reshape(x.shape)
    vals = values(w).to(x.device).float()
    scales = rows_of(w.scales.float(), w.out_features).to(x.device)
    scales = scales.repeat_interleave(w.group, dim=1)
    y = xr @ (vals * scales).T
    if w.offsets.numel():
        offsets = rows_of(w.offsets.float(), w.out_features).to(x.device)
        y = y + x.float().reshape(x.shape[0], -1, w.group).sum(-1) @ offsets.T
    return y


def igemm(x: torch.Tensor, w: IGemmWeight, flavour: str | None = None) -> torch.Tensor:
    """x (M, K) any float dtype -> (M, N) fp32. `flavour` picks a build (default: the best this
    CPU runs); without a built kernel, or off the CPU, the torch reference runs."""
    module = build.module_for(x.device.type, flavour)
    if module is None:
        return igemm_torch(x, w)
    product = module.igemm if w.bits == 4 else module.igemm8
    return product(x.float().contiguous(), w.q, w.scales, w.offsets, w.out_features, w.group)
