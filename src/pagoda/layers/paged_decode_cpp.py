"""The C++ paged decode-attention kernel (`kernels/csrc/paged_decode.cpp`), built on first use.

It is part of the module of every ISA flavour (`pagoda.kernels.build`); the engine uses the best
flavour this CPU runs. When it cannot be built, callers fall back to gather + SDPA.
"""

from __future__ import annotations

from typing import Any

import torch

from pagoda.kernels import build


def extension(flavour: str | None = None) -> Any | None:
    """The compiled module (the best flavour, or `flavour`), or None if it cannot be built here
    (logged once)."""
    return build.load(flavour) if flavour else build.native()


def available() -> bool:
    return extension() is not None


def paged_decode_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, window: int | None,
                           flavour: str | None = None) -> torch.Tensor:
    """q: (D, H, hd) fp32; k/v_blocks: (num_blocks, block_size, kvh, hd). Returns (D, H, hd)."""
    module = extension(flavour)
    assert module is not None, "check available() first"
    return module.paged_decode(q, k_blocks, v_blocks, block_tables, context_lens, scale,
                               window or 0)
