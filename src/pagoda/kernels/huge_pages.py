"""The weights a decode step streams, moved into memory mapped in 2 MiB pages.

A batch-1 decode step reads every weight once. In 4 KiB pages SmolLM2-135M's fp32 linears
(513 MiB in fgemm's blocks) are ~131,000 pages: the second-level TLB holds 2,048 entries (8 MiB),
so every page of every step is a TLB miss and a page walk on the weight streams' path. In 2 MiB
pages they are 257 entries. Measured on the 2-core Xeon (docs/benchmarks.md, "Twenty-third
session"): the 121 linears 15-23% faster at 1-17 rows (avx512), 9-24% (avx2 build); decode
through the engine 5-13%.

Linux gives anonymous memory transparent huge pages where the program asks for them
(`madvise(MADV_HUGEPAGE)`, the default "madvise" mode of
/sys/kernel/mm/transparent_hugepage/enabled) when the range is 2 MiB-aligned and not yet touched.
So `settle` copies the tensors into one fresh private anonymous mapping, advised before the copy
touches it, and points each tensor at its copy (`Tensor.set_`: every holder of the tensor object
sees the new memory, nothing else changes; the values are the same bits). Where the kernel says
"never", or off Linux, nothing moves.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # every tensor starts on a cache line, as the kernels' vector loads prefer
MIN_BYTES = 4096  # smaller tensors share their 4 KiB page with others anyway
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Linux with transparent huge pages not switched off."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def movable(t: torch.Tensor) -> bool:
    """A contiguous CPU tensor that is the only view of its whole storage: moving it leaves no
    other view on the old memory (which would then stay allocated beside the copy)."""
    return (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided
            and not t.is_quantized and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and t.numel() * t.element_size() >= MIN_BYTES)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def settle(tensors: Iterable[torch.Tensor]) -> int:
    """Move the `movable` tensors among `tensors` (each once) into one mapping advised for huge
    pages, in the order given (the order a step reads them); returns the bytes moved. Each old
    storage is freed as soon as its tensor moves (unless something else holds it), so memory
    peaks at about the tensors' size plus the largest one. Call it before any forward runs on
    the tensors: a kernel reading one while it moves would read freed memory."""
    if not available():
        return 0
    seen: set[int] = set()
    moving = []
    for t in tensors:
        if id(t) not in seen and movable(t):
            seen.add(id(t))
            moving.append(t)
    if not moving:
        return 0
    offsets, total = [], 0
    for t in moving:
        offsets.append(total)
        total = _round_up(total + t.numel() * t.element_size(), ALIGN)
    # A private anonymous mapping (Python's default is shared memory, which anonymous THP does
    # not cover), one huge page larger so that the data can start on a 2 MiB boundary.
    try:
        region = mmap.mmap(-1, _round_up(total, HUGE_PAGE) + HUGE_PAGE,
                           flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no address space or memory for the copy: the tensors stay as they are
        return 0
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` while any view lives
    start = -whole.data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, _round_up(total, HUGE_PAGE))
    with torch.inference_mode():  # inference tensors (packed under it) take set_ only there
        for t, offset in zip(moving, offsets, strict=True):
            size = t.numel() * t.element_size()
            dst = whole[start + offset:start + offset + size].view(t.dtype).view(t.shape)
            dst.copy_(t)
            t.set_(dst.untyped_storage(), dst.storage_offset(), t.shape, t.stride())
    return total
