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


def assert_rows_batch_invariant(run, k: int) -> None:
    """`run(x)` gives row 5 of a batch the same bits alone, first among a few rows, and at its
    place among 6 to 70 rows (every tile size and path a kernel picks by M)."""
    torch.manual_seed(0)
    batch = torch.randn(70, k)
    alone = run(batch[5:6])
    for m in (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 25, 70):
        rows = batch[:m] if m > 5 else torch.cat([batch[5:6], batch[:m - 1]])
        at = 5 if m > 5 else 0
        assert torch.equal(run(rows)[at], alone[0]), f"row changed at M={m}"


def assert_flavours_agree(run, flavours: list[str], k: int) -> None:
    """`run(x, flavour)` returns the same bits from every flavour, at several row counts."""
    for m in (1, 3, 6, 8, 9, 12, 40):
        x = torch.randn(m, k)
        ys = {f: run(x, f) for f in flavours}
        for f, y in ys.items():
            assert torch.equal(y, ys[flavours[0]]), f"{f} differs from {flavours[0]} at M={m}"
