"""Weights and error measure shared by the qgemm and wgemm kernel tests."""

from __future__ import annotations

import torch

from pagoda.kernels.qgemm import QGemmWeight


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of `y` against `ref`, computed in fp64."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm())


def make_weight(kind: str, n: int, k: int, seed: int = 0) -> QGemmWeight:
    """int8 per channel ("int8"), 4-bit groups with offsets ("q4g32", "q4g64": Q4_1-like), 8-bit
    groups with or without offsets ("q8g16": Q6_K-like, "q8g32": Q8_0, "q8g32-off"), extreme
    values included. A "-h" suffix rounds scales and offsets to fp16 values (GGUF's own)."""
    g = torch.Generator().manual_seed(seed)
    bits = 4 if kind.startswith("q4") else 8
    group = k if kind == "int8" else int(kind.split("g")[1].split("-")[0])
    if bits == 4:
        q = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        q[0, :8] = 0xFF  # 15 in both nibbles
    else:
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        q[0, :64] = -128  # the most negative value takes qgemm's |w| path's 128
    scales = torch.rand(n, k // group, generator=g) * 0.01 + 1e-4
    offsets = None
    if bits == 4 or kind.endswith("-off"):
        offsets = -(torch.rand(n, k // group, generator=g) * 0.1)
    if kind.endswith("-h"):
        scales = scales.half().float()
        offsets = None if offsets is None else offsets.half().float()
    return QGemmWeight(q, scales, offsets, bits, group)
