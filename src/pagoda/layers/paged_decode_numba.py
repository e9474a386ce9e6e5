"""A CPU kernel for decode attention straight over the paged KV cache (numba).

The torch path gathers each request's blocks into a padded copy and then runs SDPA, so every
K/V byte is read twice and written once per layer. Here each (request, kv head) task walks its
block table and reads every K/V row exactly once, with all query heads of the group at a time
(grouped-query attention without copying K/V). Softmax uses a running max in fp32.

Only used on the CPU with an fp32 KV store; other devices and KV dtypes take the torch path.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange

    # numba's OpenMP layer shares libgomp with torch and the two fight over its thread pool
    # (decode steps measured 4x slower); the workqueue layer keeps them apart.
    numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover - numba is a dependency; keep the torch path usable
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _decode(q, k_cache, v_cache, tables, lens, window, scale, out):  # pragma: no cover
        # q, out: (D, H, hd); k_cache, v_cache: (num_blocks, block_size, kvh, hd)
        num_decode, num_heads, head_dim = q.shape
        block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv
        for task in prange(num_decode * num_kv):
            d = task // num_kv
            g = task % num_kv
            length = lens[d]
            start = max(0, length - window) if window > 0 else 0
            n = length - start
            scores = np.empty((group, n), dtype=np.float32)
            for t in range(start, length):
                block = tables[d, t // block_size]
                off = t % block_size
                for h in range(group):
                    s = np.float32(0.0)
                    for i in range(head_dim):
                        s += q[d, g * group + h, i] * k_cache[block, off, g, i]
                    scores[h, t - start] = s * scale
            for h in range(group):
                m = scores[h, 0]
                for t in range(1, n):
                    m = max(m, scores[h, t])
                total = np.float32(0.0)
                for t in range(n):
                    e = np.exp(scores[h, t] - m)
                    scores[h, t] = e
                    total += e
                inv = np.float32(1.0) / total
                for t in range(n):
                    scores[h, t] *= inv
            acc = np.zeros((group, head_dim), dtype=np.float32)
            for t in range(start, length):
                block = tables[d, t // block_size]
                off = t % block_size
                for h in range(group):
                    p = scores[h, t - start]
                    for i in range(head_dim):
                        acc[h, i] += p * v_cache[block, off, g, i]
            for h in range(group):
                for i in range(head_dim):
                    out[d, g * group + h, i] = acc[h, i]


def paged_decode_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, window: int | None) -> torch.Tensor:
    """q: (D, H, hd) fp32; k/v_blocks: (num_blocks, block_size, kvh, hd). Returns (D, H, hd)."""
    q = q.contiguous()
    out = torch.empty_like(q)
    _decode(q.numpy(), k_blocks.numpy(), v_blocks.numpy(), block_tables.numpy(),
            context_lens.numpy(), window or 0, np.float32(scale), out.numpy())
    return out
