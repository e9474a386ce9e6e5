"""Runs one scheduled step: builds input tensors and attention metadata, runs the model, samples.

Only the positions that sample go through the LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention_metadata import AttentionMetadata, PrefillSpan
from pagoda.layers.decode_backend import DecodeKernel
from pagoda.sampling.sampler import Sampler
from pagoda.scheduler.output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput


class ModelRunner:
    def __init__(self, model: nn.Module, kv_stores: list[KVStore], block_size: int,
                 device: torch.device, eos_token_ids: tuple[int, ...], seed: int | None = None,
                 layer_groups: list[int] | None = None,
                 decode_kernel: DecodeKernel | None = None, invariant_attention: bool = False):
        self.model = model
        self.decode_kernel = decode_kernel
        # Every query (prefill rows too) through the decode kernel: only where that kernel reads
        # the cache in place (fp32 CPU stores); the gather fallback would copy each query's
        # whole context.
        self.invariant_attention = (invariant_attention and decode_kernel is not None and all(
            store.fp32_cpu_blocks() is not None for store in kv_stores))
        self.layer_groups = layer_groups or [0] * len(kv_stores)  # KV group of each layer
        self.kv_stores = kv_stores
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(seed)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # Decodes (one token) first, then prefill chunks: the layout AttentionMetadata expects.
        ordered = sorted(sched.scheduled, key=lambda r: len(r.token_ids) > 1)
        input_ids, positions, meta, sample_rows = self._prepare(ordered)
        hidden = self.model(input_ids, positions, self.kv_stores, meta)
        sampling = [ordered[i] for i, _ in sample_rows]
        if not sampling:
            return ModelRunnerOutput({}, {})
        rows = torch.tensor([row for _, row in sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        token_ids, logprobs = self.sampler(logits.cpu(), sampling, self.eos_token_ids)
        return ModelRunnerOutput(
            sampled_token_ids={r.req_id: t for r, t in zip(sampling, token_ids, strict=True)},
            logprobs={r.req_id: lp for r, lp in zip(sampling, logprobs, strict=True)
                      if lp is not None},
        )

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare(self, ordered: list[ScheduledRequest]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata],
                            list[tuple[int, int]]]:
        """Flat token batch, then one AttentionMetadata per layer (shared within a KV group)."""
        tokens: list[int] = []
        positions: list[int] = []
        sample_rows: list[tuple[int, int]] = []  # (index in ordered, row in the flat batch)
        for i, r in enumerate(ordered):
            start, n = r.num_computed_tokens, len(r.token_ids)
            offset = len(tokens)
            tokens += r.token_ids
            positions += range(start, start + n)
            if r.sample:
                sample_rows.append((i, offset + n - 1))
        num_groups = len(ordered[0].block_ids)
        group_metas = [self._group_meta(ordered, g) for g in range(num_groups)]
        metas = [group_metas[g] for g in self.layer_groups]
        return (torch.tensor(tokens, device=self.device),
                torch.tensor(positions, device=self.device), metas, sample_rows)

    def _group_meta(self, ordered: list[ScheduledRequest], group: int) -> AttentionMetadata:
        slot_mapping: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        offset = 0
        for r in ordered:
            # -1 marks blocks a sliding window released: never read unmasked, so any id will do.
            table = [max(b, 0) for b in r.block_ids[group]]
            start, n = r.num_computed_tokens, len(r.token_ids)
            slot_mapping += self._slots(table, start, start + n)
            if n == 1 or self.invariant_attention:
                # a query per token, each reading its own causal context from the cache
                decode_tables += [table] * n
                decode_lens += range(start + 1, start + n + 1)
            else:
                ctx = None
                if start > 0:
                    num_blocks = -(-(start + n) // self.block_size)
                    ctx = torch.tensor(table[:num_blocks], device=self.device)
                prefills.append(PrefillSpan(offset, n, start, ctx))
            offset += n
        tables_t = lens_t = None
        if decode_tables:
            tables_t, lens_t = self._decode_tables(decode_tables, decode_lens)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, device=self.device),
            num_decode=len(decode_tables),
            decode_block_tables=tables_t,
            decode_context_lens=lens_t,
            prefills=prefills,
            block_size=self.block_size,
            decode_kernel=self.decode_kernel,
        )

    def _decode_tables(self, tables: list[list[int]], lens: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, max_blocks) block tables cut to each context, padded with block 0 (masked)."""
        max_blocks = -(-max(lens) // self.block_size)
        rows = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        return (torch.tensor(rows, device=self.device), torch.tensor(lens, device=self.device))
