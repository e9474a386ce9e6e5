"""`fgemm`: fp32 activations times fp32 weights, one fixed chain of fmas per output.

    y[r, n] = fma(x[r, K-1], w[n, K-1], ... fma(x[r, 1], w[n, 1], fma(x[r, 0], w[n, 0], 0)))

Every output is that chain whatever the batch, tile or ISA flavour (`csrc/fgemm.cpp`), so a
row's result does not depend on the rows beside it, and the generic, avx2 and avx512 builds
return the same bits. Up to ten rows (decode steps, speculative verification) share every
weight load and cost about what one row does; more rows run the same tile as an fp32 GEMM's inner
loop. The weights are read in wgemm's layout (`pack`): blocks of 16 outputs whose values at one
k sit side by side, a copy of the (N, K) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kernels import build
from pagoda.kernels.wgemm import OUT_BLOCK, blocks_of, rows_of


@dataclass(frozen=True)
class FGemmWeight:
    """(N, K) fp32 weights as (N/16, K, 16) blocks (N padded with zero weights)."""

    w: torch.Tensor
    out_features: int


def pack(weight: torch.Tensor) -> FGemmWeight:
    n = weight.shape[0]
    return FGemmWeight(blocks_of(weight.detach().float(), -n % OUT_BLOCK), n)


def unpack(w: FGemmWeight) -> torch.Tensor:
    return rows_of(w.w, w.out_features)


def fgemm(x: torch.Tensor, w: FGemmWeight, flavour: str | None = None) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32. `flavour` picks a build (default: the best this CPU runs);
    without a built kernel, or off the CPU, torch's product runs (other bits)."""
    module = build.module_for(x.device.type, flavour)
    if module is None:
        return x.float() @ unpack(w).to(x.device).T
    return module.fgemm(x.float().contiguous(), w.w, w.out_features)
