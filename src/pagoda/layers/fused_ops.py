"""The elementwise steps of a decoder layer as single C++ calls (`kernels/csrc/fused_ops.cpp`).

Measured on the CPU at batch 1 (docs/benchmarks.md): a decode step of SmolLM2 with 4-bit
weights spent about as long in ~25 small torch ops per layer (RMSNorm's six, RoPE's eight, the
cache write, SiLU * up, the residual adds) as in the weight products. Here each group is one call:

- `rms_norm(x, norm)`, `add_rms_norm(x, delta, norm)` -> (x + delta, its norm);
- `rope_write(qkv, ...)`: q and k of the fused qkv rotated in place, k and v written to their
  cache slots;
- `silu_mul(gate_up)`;
- `decode_layer(...)`: a whole Llama layer (the above and its four qgemm products and the paged
  decode attention) in one call, when every row of the step attends through the decode kernel;
  and then all of a model's layers in one call (`LlamaDecodeStack`, held by the model).

Each output row depends on its own input row only (batch-invariant). RoPE and the residual add
are bit-identical to the torch expressions; RMSNorm's sum and SiLU's exp differ in the last bits.
The engine uses them on CPU models whose linears are quantized or fp32 on fgemm
(`EngineConfig.fused_ops`): fgemm's bits are not transformers' either, and what is tested
against transformers is the
greedy tokens (tests/engine/test_hf_reference.py; a teacher-forced check over 2,314 positions,
HF margins down to 8e-5, found no top-1 that differs, fused or not). Every method takes CPU fp32
tensors; callers keep their torch path for anything else.
"""

from __future__ import annotations

from typing import Any

import torch

from pagoda.kernels import build
from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers import paged_decode_cpp
from pagoda.layers.attention_metadata import AttentionMetadata
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding


class FusedOps:
    def __init__(self, module: Any, whole_layers: bool = True, whole_model: bool = True):
        self.module = module  # one ISA flavour's compiled kernels
        # decode_layer() allowed (off: one call per elementwise step, for tests)
        self.whole_layers = whole_layers
        # a model may run all its layers in one call when each would be one (off: per layer)
        self.whole_model = whole_model
        self.num_layer_calls = 0  # layers run as one call (counted by the model; for tests)
        self.flavour: str = module.flavour()
        self._is_native = module is build.native()

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
        False (nothing done) when the store does not keep a float dtype on the CPU."""
        blocks = store.cpu_blocks()
        if blocks is None or not qkv.is_contiguous():
            return False
        self.module.rope_write(qkv, positions, rope.cos, rope.sin_signed, num_heads,
                               num_kv_heads, blocks[0], blocks[1], slot_mapping)
        return True

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.module.silu_mul(gate_up.contiguous())

    def native_operands(self, linear: Any) -> tuple[list[torch.Tensor], list[int]] | None:
        """([q, scales, offsets], form) of a linear whose products run on this module's flavour
        of qgemm (form [bits, group]), wgemm (packed operands, form [bits, group, N]), igemm
        (packed operands, form [bits, group, N, 1]) or fgemm ([blocks, -, -], form [N]), else
        None (another kernel or flavour: the layer then runs in Python, where each module
        computes with its own)."""
        operands = getattr(linear, "native_operands", None)
        found = operands(torch.device("cpu")) if operands is not None else None
        if found is None:
            return None
        kernel, weight, flavour = found
        if flavour != self.flavour and not (flavour == "" and self._is_native):
            return None
        if kernel == "fgemm":
            return [weight.w, _NO_OFFSETS, _NO_OFFSETS], [weight.out_features]
        if kernel == "wgemm":
            return ([weight.q, weight.scales, weight.offsets],
                    [weight.bits, weight.group, weight.out_features])
        if kernel == "igemm":
            return ([weight.q, weight.scales, weight.offsets],
                    [weight.bits, weight.group, weight.out_features, 1])
        offsets = weight.offsets if weight.offsets is not None else _NO_OFFSETS
        return [weight.q, weight.scales, offsets], [weight.bits, weight.group]

    def decode_layer(self, meta: AttentionMetadata, store: KVStore) -> bool:
        """Whether a layer can run as one call this step: every row attends through the C++
        decode kernel of this module over a float CPU cache (fp32, fp16, bf16)."""
        return (self.whole_layers and not meta.prefills and self._is_native
                and meta.decode_kernel is paged_decode_cpp.paged_decode_attention
                and meta.decode_block_tables is not None
                and meta.decode_block_tables.shape[0] == meta.slot_mapping.shape[0]
                and store.cpu_blocks() is not None)


_NO_OFFSETS = torch.zeros(0)  # what the C++ takes for "no offsets"
