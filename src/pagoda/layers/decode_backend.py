"""Which kernel runs decode attention over the paged KV cache.

- "torch": gather each request's blocks into a padded copy, then SDPA. Runs on every device.
- "cpp": the C++ kernel (`paged_decode_cpp`), reading K/V in place on ATen's thread pool.
- "numba": the same algorithm in numba; its own thread pool competes with torch's on few cores.
- "auto": "cpp" on the CPU when it builds, else "torch".

A kernel takes q (D, H, hd) fp32, the block views of K and V, the block tables, the context
lengths, the softmax scale and the sliding window, and returns (D, H, hd). The C++ kernel reads
fp32, fp16 and bf16 caches, numba's fp32 only; int8 and GPU stores always take the torch path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagoda.kv_cache.kv_store import KVStore

DecodeKernel = Callable[..., torch.Tensor]
BACKENDS = ("auto", "torch", "cpp", "numba")


def blocks_read_in_place(kernel: DecodeKernel, store: KVStore
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`store`'s K and V block views when `kernel` reads them where they lie, else None (the
    gather + SDPA path)."""
    blocks = store.cpu_blocks()
    if blocks is None:
        return None
    from pagoda.layers import paged_decode_cpp

    if kernel is paged_decode_cpp.paged_decode_attention:
        readable: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    else:
        readable = (torch.float32,)
    return blocks if blocks[0].dtype in readable else None


def select_decode_kernel(backend: str, device: torch.device | str) -> DecodeKernel | None:
    """The kernel for `backend` on `device`, or None for the gather + SDPA path."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} not in {BACKENDS}")
    if backend == "torch" or torch.device(device).type != "cpu":
        return None
    if backend in ("auto", "cpp"):
        from pagoda.layers import paged_decode_cpp

        if paged_decode_cpp.available():
            return paged_decode_cpp.paged_decode_attention
        if backend == "cpp":
            raise RuntimeError("the C++ attention kernel could not be built here (needs a C++ "
                               "compiler and ninja); use --attention-backend torch")
        return None
    from pagoda.layers import paged_decode_numba

    if not paged_decode_numba.available():
        raise RuntimeError("numba is not installed; use --attention-backend torch")
    return paged_decode_numba.paged_decode_attention
