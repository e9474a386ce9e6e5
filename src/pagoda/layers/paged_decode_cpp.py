"""The C++ paged decode-attention kernel (`csrc/paged_decode.cpp`), built on first use.

torch's extension builder compiles it once per source version into ~/.cache/torch_extensions
(about a minute, with a compiler and ninja present); later loads take milliseconds. When it
cannot be built (no compiler, not a CPU build), callers fall back to gather + SDPA.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


def _build_name() -> str:
    """Builds use -march=native, so the cached binary is keyed by this CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    key = f"{platform.machine()}|{flags}".encode()
    return "pagoda_paged_decode_" + hashlib.blake2b(key, digest_size=4).hexdigest()


@cache
def extension() -> Any | None:
    """The compiled module, or None if it cannot be built here (logged once)."""
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    log.info("loading the C++ paged-attention kernel (the first build takes about a minute)")
    try:
        module = load(name=_build_name(), sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                      verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("C++ paged-attention kernel unavailable (%s: %s); using gather + SDPA",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    log.info("C++ paged-attention kernel ready in %.1f s", time.perf_counter() - start)
    return module


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


if __name__ == "__main__":  # `python -m pagoda.layers.paged_decode_cpp`: build it now (make does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(0 if available() else 1)
