"""The C++ paged decode-attention kernel (`csrc/paged_decode.cpp`), built on first use.

torch's extension builder compiles it once per source version into ~/.cache/torch_extensions
(see `native_build`). When it cannot be built, callers fall back to gather + SDPA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagoda.layers.native_build import load_native

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


def extension() -> Any | None:
    """The compiled module, or None if it cannot be built here (logged once)."""
    return load_native("paged_decode", SOURCE, "the C++ paged-attention kernel")


def available() -> bool:
    return extension() is not None


def paged_decode_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, window: int | None) -> torch.Tensor:
    """q: (D, H, hd) fp32; k/v_blocks: (num_blocks, block_size, kvh, hd). Returns (D, H, hd)."""
    module = extension()
    assert module is not None, "check available() first"
    return module.paged_decode(q, k_blocks, v_blocks, block_tables, context_lens, scale,
                               window or 0)
