"""Rotary position embedding in the half-split layout (HF's `rotate_half`).

GGUF's permuted q/k rows are un-permuted at load time, so one layout serves both weight sources.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: float = 1.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                                    / head_dim))
        positions = torch.arange(max_positions, dtype=torch.float32) / scaling
        freqs = torch.outer(positions, inv_freq)  # (max_positions, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        # rotate_half(x) * sin == roll(x, half) * sin_signed, with sin_signed's first half
        # negated: negation is exact, so this equals HF's formula bit for bit in fewer ops.
        half = head_dim // 2
        self.register_buffer("sin_signed", torch.cat((-emb.sin()[:, :half], emb.sin()[:, half:]),
                                                     dim=-1), persistent=False)
        self.half = half
        # Every layer of one forward passes the same positions tensor: its (cos, sin) rows are
        # gathered once. The memo holds the tensor itself, so its id cannot be reused meanwhile.
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (T, n_heads, head_dim), k: (T, n_kv_heads, head_dim), positions: (T,)."""
        if self._memo is None or self._memo[0] is not positions:
            self._memo = (positions, self.cos[positions].unsqueeze(1),  # (T, 1, head_dim)
                          self.sin_signed[positions].unsqueeze(1))
        _, cos, sin = self._memo
        return (q * cos + torch.roll(q, self.half, -1) * sin,
                k * cos + torch.roll(k, self.half, -1) * sin)
