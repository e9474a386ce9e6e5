"""Runs one embedding step: packed sequences in, one pooled float32 vector per sequence out.

Two model kinds, one contract (`embed(sequences) -> (B, H)`):
  * an encoder (BERT): its own packed forward, bidirectional attention per sequence;
  * a decoder served with `--task embed`: the generation model's forward over fresh prefill
    spans (causal, nothing cached) with a KV store that keeps nothing — embedding requests never
    hold KV blocks — then its final-norm hidden states are pooled.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention_metadata import AttentionMetadata, PrefillSpan
from pagoda.layers.pooler import PoolingConfig, pool
from pagoda.models.bert import BertEncoder, PackedBatch


class DiscardingKVStore(KVStore):
    """A store that keeps nothing: every span of an embedding step starts uncached, so attention
    reads the fresh K/V and never the store."""

    def __init__(self) -> None:
        super().__init__(0, 1, 1, 1, torch.device("cpu"))

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        return None

    def cpu_blocks(self) -> None:
        return None


class PoolingRunner:
    def __init__(self, model: nn.Module, pooling: PoolingConfig, device: torch.device):
        self.model, self.pooling, self.device = model, pooling, device
        self.is_encoder = isinstance(model, BertEncoder)
        if not self.is_encoder:
            self.stores = [DiscardingKVStore() for _ in model.layers]

    @torch.inference_mode()
    def embed(self, sequences: list[list[int]]) -> torch.Tensor:
        batch = PackedBatch.of(sequences, self.device)
        if self.is_encoder:
            hidden = self.model(batch)
        else:
            spans, start = [], 0
            for n in batch.lengths:
                spans.append(PrefillSpan(start, n, 0, None))
                start += n
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(start, dtype=torch.long), num_decode=0,
                decode_block_tables=None, decode_context_lens=None, prefills=spans, block_size=1)
            hidden = self.model(batch.input_ids, batch.positions, self.stores, meta)
        return pool(hidden, batch.lengths, self.pooling).cpu()
