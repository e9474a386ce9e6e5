"""The elementwise steps of a decoder layer as single C++ calls (`kernels/csrc/fused_ops.cpp`).

Measured on the CPU at batch 1 (docs/benchmarks.md): a decode step of SmolLM2 with 4-bit
weights spent about as long in ~25 small torch ops per layer (RMSNorm's six, RoPE's eight, the
cache write, SiLU * up, the residual adds) as in the weight products. Here each group is one call:

- `rms_norm(x, norm)`, `add_rms_norm(x, delta, norm)` -> (x + delta, its norm);
- `rope_write(qkv, ...)`: q and k of the fused qkv rotated in place, k and v written to their
  cache slots;
- `silu_mul(gate_up)`.

Each output row depends on its own input row only (batch-invariant). RoPE and the residual add
are bit-identical to the torch expressions; RMSNorm's sum and SiLU's exp differ in the last bits,
so the engine uses these only where fp32 identity with transformers is not the contract: models
with quantized linears (`EngineConfig.fused_ops`). Every method takes CPU fp32 tensors; callers
keep their torch path for anything else.
"""

from __future__ import annotations

from typing import Any

import torch

from pagoda.kernels import build
from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding


class FusedOps:
    def __init__(self, module: Any):
        self.module = module  # one ISA flavour's compiled kernels

    @classmethod
    def load(cls, flavour: str | None = None) -> FusedOps | None:
        """The best flavour this CPU runs (or `flavour`), None when none builds here."""
        module = build.load(flavour) if flavour else build.native()
        return cls(module) if module is not None and hasattr(module, "rms_norm") else None

    @staticmethod
    def applies(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return self.module.rms_norm(x.contiguous(), norm.weight, norm.eps, norm.offset)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        total, normed = self.module.add_rms_norm(x.contiguous(), delta.contiguous(), norm.weight,
                                                 norm.eps, norm.offset)
        return total, normed

    def rope_write(self, qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                   num_heads: int, num_kv_heads: int, store: KVStore,
                   slot_mapping: torch.Tensor) -> bool:
        """Rotate q and k of `qkv` (T, (H + 2 KVH) * hd) in place and write k, v to the store;
        False (nothing done) when the store does not keep fp32 on the CPU."""
        blocks = store.fp32_cpu_blocks()
        if blocks is None or not qkv.is_contiguous():
            return False
        self.module.rope_write(qkv, positions, rope.cos, rope.sin_signed, num_heads,
                               num_kv_heads, blocks[0], blocks[1], slot_mapping)
        return True

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.module.silu_mul(gate_up.contiguous())
