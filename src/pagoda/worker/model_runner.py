"""Runs one scheduled step: builds input tensors and attention metadata, runs the model, samples.

Only the positions that sample go through the LM head. With speculative decoding the step first
asks the proposer for the drafts the scheduler made room for, appends them to their requests'
tokens, and verifies them: a request with m drafts samples at its last m + 1 positions, and its
queries attend one row at a time through the decode kernel, so each verified position sees
exactly the attention it would see as a plain decode. Constrained requests' rows are masked by
their grammar (drafts included) before sampling, and their grammar state advances on the tokens
the step accepted.

`execute` is `collect(submit(sched))`: `submit` proposes and starts the forward, `collect`
finishes it and samples. Between the two, rank 0 of a pipeline starts other batches.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from pagoda.engine.outputs import TokenLogprobs
from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention_metadata import AttentionMetadata, PrefillSpan
from pagoda.layers.decode_backend import DecodeKernel, blocks_read_in_place
from pagoda.sampling.sampler import NO_TOKEN, Sampler, token_logprobs
from pagoda.scheduler.output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagoda.spec_decode.proposer import Draft, Proposer
from pagoda.spec_decode.rejection_sampler import RejectionSampler
from pagoda.structured_output.manager import StructuredOutputManager


class StepPeers(Protocol):
    """Other ranks that must run each forward this runner runs (parallel/peers.py)."""

    def send(self, scheduled: list[ScheduledRequest], num_rows: dict[str, int]) -> None: ...

    def collect(self) -> None: ...


Prepared = tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]  # ids, positions, metas


class PipelineStages(Protocol):
    """This rank's stage of pipeline parallelism (parallel/pipeline.py): runs batches through
    the ring. Rank 0 `start`s a batch and later `finish`es it (the final hidden states); other
    ranks `run` theirs whole."""

    first: bool  # stage 0 (rank 0 and, under tensor parallelism, its stage's other ranks)
    depth: int  # batches rank 0 may have started and not finished

    def run(self, model: nn.Module, prepared: Prepared, kv_stores: list[KVStore]
            ) -> torch.Tensor | None: ...

    def start(self, model: nn.Module, prepared: Prepared, kv_stores: list[KVStore]
              ) -> object: ...

    def finish(self, model: nn.Module, flight: object) -> torch.Tensor: ...


@dataclasses.dataclass
class Forward:
    """A batch whose forward has started: `hidden` is known, or `flight` is a pipeline's handle
    on it. `sample_rows` are (index in `ordered`, rows of the hidden states)."""

    ordered: list[ScheduledRequest]
    sample_rows: list[tuple[int, range]]
    hidden: torch.Tensor | None = None
    flight: object = None


@dataclasses.dataclass
class Submitted:
    """A step between `submit` and `collect`: its forward and the drafts it verifies."""

    forward: Forward
    drafts: dict[str, Draft]


def batch_order(scheduled: list[ScheduledRequest], num_rows: dict[str, int]
                ) -> list[ScheduledRequest]:
    """Rows attending one query at a time (decodes, verified drafts) first, then prefill
    chunks: the layout AttentionMetadata expects (every rank orders a step the same way)."""
    return sorted(scheduled, key=lambda r: len(r.token_ids) > 1 and r.req_id not in num_rows)


NOTHING_ALLOWED = ("no token is allowed at this point of the output: the request's constraints "
                   "(its grammar, allowed_token_ids, min_tokens) exclude every token")
PROMPT_LOGPROBS_ROWS = 256  # prompt positions scored per LM-head call: (256, V) fp32 logits


class ModelRunner:
    def __init__(self, model: nn.Module, kv_stores: list[KVStore], block_size: int,
                 device: torch.device, eos_token_ids: tuple[int, ...], seed: int | None = None,
                 layer_groups: list[int] | None = None,
                 decode_kernel: DecodeKernel | None = None, invariant_attention: bool = False,
                 proposer: Proposer | None = None,
                 structured: StructuredOutputManager | None = None, score_prompts: bool = True,
                 peers: StepPeers | None = None, pipeline: PipelineStages | None = None):
        self.model = model
        self.peers = peers  # tensor or pipeline parallelism: the ranks that run every forward
        self.pipeline = pipeline  # pipeline parallelism: `model` holds this rank's stage
        self.decode_kernel = decode_kernel
        # Every query (prefill rows too) through the decode kernel: only where that kernel reads
        # the cache in place; the gather fallback would copy each query's whole context.
        self.invariant_attention = (invariant_attention and decode_kernel is not None and all(
            blocks_read_in_place(decode_kernel, store) is not None for store in kv_stores))
        self.layer_groups = layer_groups or [0] * len(kv_stores)  # KV group of each layer
        self.kv_stores = kv_stores
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(seed)
        self.proposer = proposer
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.structured = structured  # grammar masks of constrained requests (and their state)
        # forward() scores the prompts of requests asking for prompt log-probs (the target
        # model's runner does; a draft model's does not)
        self.score_prompts = score_prompts
        self._prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = {}

    @property
    def depth(self) -> int:
        """Steps that may be submitted and not yet collected (pipeline stages in flight)."""
        return self.pipeline.depth if self.pipeline is not None else 1

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.submit(sched))

    @torch.inference_mode()
    def submit(self, sched: SchedulerOutput) -> Submitted:
        """Propose drafts and start the forward (all of it, unless a pipeline's later stages
        are still to run it)."""
        drafts = self._propose(sched)
        batch = [dataclasses.replace(r, token_ids=r.token_ids + drafts[r.req_id].token_ids)
                 if r.req_id in drafts else r for r in sched.scheduled]
        num_rows = {rid: len(d.token_ids) + 1 for rid, d in drafts.items()}
        return Submitted(self.start_forward(batch, num_rows), drafts)

    @torch.inference_mode()
    def collect(self, submitted: Submitted) -> ModelRunnerOutput:
        """Finish the forward, then mask, sample and verify."""
        drafts = submitted.drafts
        num_rows = {rid: len(d.token_ids) + 1 for rid, d in drafts.items()}
        sampling, logits = self.finish_forward(submitted.forward)
        prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, {}
        if not sampling:
            return ModelRunnerOutput({}, {}, prompt_logprobs=prompt_logprobs)
        logits = logits.cpu()
        # Each request's rows: one per plain request, len(draft) + 1 consecutive per verified one.
        rows: dict[str, range] = {}
        start = 0
        for r in sampling:
            rows[r.req_id] = range(start, start + num_rows.get(r.req_id, 1))
            start = rows[r.req_id].stop
        if self.structured is not None:
            self.structured.apply_masks(logits, rows,
                                        {rid: d.token_ids for rid, d in drafts.items()})
        plain = [r for r in sampling if r.req_id not in drafts]
        plain_rows = [rows[r.req_id].start for r in plain]
        verify = [r for r in sampling if r.req_id in drafts]
        verify_rows = [i for r in verify for i in rows[r.req_id]]
        new_tokens: dict[str, list[int]] = {}
        new_logprobs = {}
        if plain:
            token_ids, logprobs = self.sampler(_rows(logits, plain_rows), plain,
                                               self.eos_token_ids)
            for r, t, lp in zip(plain, token_ids, logprobs, strict=True):
                new_tokens[r.req_id] = [t]
                if lp is not None:
                    new_logprobs[r.req_id] = [lp]
        if verify:
            # The rejection sampler reads parameters and output tokens, which the drafts appended
            # to token_ids leave as scheduled.
            items = [(r, drafts[r.req_id]) for r in verify]
            verified = self.rejection_sampler(_rows(logits, verify_rows), items,
                                              self.eos_token_ids)
            for r, (tokens, lps) in zip(verify, verified, strict=True):
                new_tokens[r.req_id] = tokens
                if lps is not None:
                    new_logprobs[r.req_id] = lps
        failed = {rid: NOTHING_ALLOWED for rid, tokens in new_tokens.items()
                  if tokens[-1] == NO_TOKEN}
        for rid in failed:  # drafts accepted before that point are kept, as plain decoding's
            new_tokens[rid].pop()
            if rid in new_logprobs:
                new_logprobs[rid].pop()
            if not new_tokens[rid]:
                del new_tokens[rid]
                new_logprobs.pop(rid, None)
        if self.structured is not None:
            self.structured.advance(new_tokens)
        return ModelRunnerOutput(new_tokens, new_logprobs,
                                 {rid: len(d.token_ids) for rid, d in drafts.items()},
                                 prompt_logprobs, failed)

    def _propose(self, sched: SchedulerOutput) -> dict[str, Draft]:
        if self.proposer is None:
            return {}
        if sched.preempted_req_ids:
            self.proposer.release(sched.preempted_req_ids)
        wanted = [r for r in sched.scheduled if r.num_spec_tokens > 0]
        if not wanted:
            return {}
        limits = {r.req_id: r.num_spec_tokens for r in wanted}
        drafts = self.proposer.propose(wanted)
        return {rid: d.head(limits[rid]) for rid, d in drafts.items()
                if rid in limits and d.token_ids}

    def release(self, req_ids: list[str]) -> None:
        """Drop per-request state (the draft's KV, the grammar) of requests that ended."""
        if self.proposer is not None and req_ids:
            self.proposer.release(req_ids)
        if self.structured is not None and req_ids:
            self.structured.release(req_ids)

    def forward(self, scheduled: list[ScheduledRequest], num_rows: dict[str, int] | None = None
                ) -> tuple[list[ScheduledRequest], torch.Tensor]:
        """Run a batch; returns the requests that sample, in row order, and their logits
        (rows, V): the last num_rows.get(req_id, 1) positions of each, consecutive."""
        return self.finish_forward(self.start_forward(scheduled, num_rows or {}))

    def start_forward(self, scheduled: list[ScheduledRequest], num_rows: dict[str, int]) -> Forward:
        if self.peers is not None:
            self.peers.send(scheduled, num_rows)
        ordered = batch_order(scheduled, num_rows)
        if self.pipeline is None:
            input_ids, positions, meta, sample_rows = self._prepare(ordered, num_rows)
            return Forward(ordered, sample_rows,
                           hidden=self.model(input_ids, positions, self.kv_stores, meta))
        assert self.pipeline.first, "only rank 0 samples"
        input_ids, positions, meta, sample_rows = self._prepare(ordered, num_rows)
        return Forward(ordered, sample_rows, flight=self.pipeline.start(
            self.model, (input_ids, positions, meta), self.kv_stores))

    def finish_forward(self, fwd: Forward) -> tuple[list[ScheduledRequest], torch.Tensor]:
        hidden = fwd.hidden
        if hidden is None:
            assert self.pipeline is not None
            if self.peers is not None:
                self.peers.collect()
            hidden = self.pipeline.finish(self.model, fwd.flight)
        if self.score_prompts:
            self._prompt_logprobs = self._score_prompts(fwd.ordered, hidden)
        sampling = [fwd.ordered[i] for i, _ in fwd.sample_rows]
        if not sampling:
            return [], hidden.new_empty((0, 0))
        rows = [row for _, r in fwd.sample_rows for row in r]
        return sampling, self.model.compute_logits(_rows(hidden, rows))

    def forward_stage(self, scheduled: list[ScheduledRequest], num_rows: dict[str, int]
                      ) -> None:
        """A later pipeline stage's part of the forward rank 0 runs (parallel/worker.py)."""
        assert self.pipeline is not None
        input_ids, positions, meta, _ = self._prepare(batch_order(scheduled, num_rows), num_rows)
        self.pipeline.run(self.model, (input_ids, positions, meta), self.kv_stores)

    def _score_prompts(self, ordered: list[ScheduledRequest], hidden: torch.Tensor
                       ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """Log-probs of the prompt tokens that this step's chunks predict, for requests that
        asked (position p's logits score prompt token p + 1)."""
        out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
        offset = 0
        for r in ordered:
            start, n = r.num_computed_tokens, len(r.token_ids)
            num_top = r.sampling_params.prompt_logprobs
            end = min(start + n, len(r.prompt_token_ids) - 1)  # positions scoring prompt tokens
            if num_top is not None and start < end:
                entries: list[TokenLogprobs] = []
                for lo in range(start, end, PROMPT_LOGPROBS_ROWS):  # bounded (rows, V) logits
                    hi = min(lo + PROMPT_LOGPROBS_ROWS, end)
                    rows = hidden[offset + lo - start:offset + hi - start]
                    logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), -1).cpu()
                    targets = r.prompt_token_ids[lo + 1:hi + 1]
                    entries += [token_logprobs(row, num_top, t)
                                for row, t in zip(logprobs, targets, strict=True)]
                out[r.req_id] = (start + 1, entries)
            offset += n
        return out

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare(self, ordered: list[ScheduledRequest], num_rows: dict[str, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata],
                            list[tuple[int, range]]]:
        """Flat token batch, then one AttentionMetadata per layer (shared within a KV group)."""
        tokens: list[int] = []
        positions: list[int] = []
        sample_rows: list[tuple[int, range]] = []  # (index in ordered, rows in the flat batch)
        for i, r in enumerate(ordered):
            start, n = r.num_computed_tokens, len(r.token_ids)
            offset = len(tokens)
            tokens += r.token_ids
            positions += range(start, start + n)
            if r.sample:
                sample_rows.append((i, range(offset + n - num_rows.get(r.req_id, 1), offset + n)))
        num_groups = len(ordered[0].block_ids)
        per_token = set(num_rows)
        group_metas = [self._group_meta(ordered, g, per_token) for g in range(num_groups)]
        metas = [group_metas[g] for g in self.layer_groups]
        return (torch.tensor(tokens, device=self.device),
                torch.tensor(positions, device=self.device), metas, sample_rows)

    def _group_meta(self, ordered: list[ScheduledRequest], group: int, per_token: set[str]
                    ) -> AttentionMetadata:
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
            if n == 1 or self.invariant_attention or r.req_id in per_token:
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


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] for increasing `rows`; all of them in order (a decode step's hidden states, the
    logits of a step whose requests all sample alike) without a copy."""
    return x if len(rows) == x.shape[0] and rows[-1] == len(rows) - 1 else x[rows]
