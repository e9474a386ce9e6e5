"""Per-step attention metadata: where new K/V go and which cached K/V each query reads.

Built by the model runner from the scheduler's output and passed to `forward` explicitly (no global
context). Token order in a step's flattened batch: all single-token decodes first, then prefill
chunks, each contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pagoda.layers.decode_backend import DecodeKernel


@dataclass
class PrefillSpan:
    start: int  # offset of the chunk's first token in the flattened batch
    num_tokens: int
    num_cached: int  # tokens of this request already in the KV cache before the chunk
    # block ids holding the whole context (num_cached + num_tokens); None when num_cached == 0
    context_blocks: torch.Tensor | None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, window: int | None) -> torch.Tensor:
        """(num_tokens, num_cached + num_tokens) bool: causal, offset by the cached prefix.

        Built once per step and window, not once per layer.
        """
        mask = self._masks.get(window)
        if mask is None:
            q_pos = torch.arange(self.num_cached, self.num_cached + self.num_tokens).unsqueeze(1)
            k_pos = torch.arange(self.num_cached + self.num_tokens).unsqueeze(0)
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[window] = mask
        return mask


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64 cache slot of each new token's K/V
    num_decode: int  # tokens [0, num_decode) are decodes: one query token each
    decode_block_tables: torch.Tensor | None  # (num_decode, max_blocks) int64, padded with 0
    decode_context_lens: torch.Tensor | None  # (num_decode,) int64, new token included
    prefills: list[PrefillSpan]
    block_size: int
    # reads decodes' K/V in place when the store is a float dtype on the CPU (decode_backend.py)
    decode_kernel: DecodeKernel | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """(num_decode, 1, 1, max_blocks * block_size) bool: where a decode query may attend."""
        mask = self._masks.get(window)
        if mask is None:
            assert self.decode_block_tables is not None and self.decode_context_lens is not None
            idx = torch.arange(self.decode_block_tables.shape[1] * self.block_size)
            lens = self.decode_context_lens.unsqueeze(1)
            mask = idx < lens
            if window is not None:
                mask &= idx >= lens - window
            mask = mask[:, None, None, :]
            self._masks[window] = mask
        return mask


def layer_meta(meta: AttentionMetadata | Sequence[AttentionMetadata], layer: int
               ) -> AttentionMetadata:
    """The metadata of `layer`: models with several KV groups get one entry per layer."""
    return meta if isinstance(meta, AttentionMetadata) else meta[layer]
