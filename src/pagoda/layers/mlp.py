"""Gated feed-forward block: down(act(gate(x)) * up(x)), with gate and up fused in one matmul.

Llama uses SiLU (SwiGLU), Gemma GELU-tanh (GeGLU). The projections stay plain `nn.Linear` named
`gate_up_proj` and `down_proj`, which the weight loader and the quantization swap rely on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int,
                 activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)
