"""The engine: scheduler + model runner + output processor behind one `step()`.

A step submits a scheduled batch to the runner and collects a batch's tokens. One process (and
tensor parallelism) collects what it submitted; M pipeline stages keep M batches of different
requests in flight (docs/parallel.md, "Batches in flight").

Not thread-safe; `EngineCore` drives it from a single thread (in the server process or in an
engine process, see `async_llm.py`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from pagoda.engine.config import (
    SPECULATIVE_DEPTH_FLOOR,
    SPECULATIVE_SOLO_DEPTH_FLOOR,
    EngineConfig,
)  # fmt: skip
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import REQUEST_ERROR, RequestOutput
from pagoda.engine.request_validator import RequestError as RequestError  # re-exported
from pagoda.engine.request_validator import RequestValidator
from pagoda.kv_cache.kv_setup import build_kv, plan_kv_groups
from pagoda.layers.decode_backend import select_decode_kernel
from pagoda.loader.model_loader import LoadedModel, load_model, resolve_model_path
from pagoda.parallel.peers import start_peers
from pagoda.quant.loading import file_linears
from pagoda.sampling.params import SamplingParams, SamplingParamsError
from pagoda.scheduler.output import SchedulerOutput
from pagoda.scheduler.request import Request
from pagoda.scheduler.scheduler import Scheduler, SchedulerConfig
from pagoda.scheduler.spec_policy import SpecDecodeConfig, SpecPolicy
from pagoda.spec_decode.setup import (
    build_proposer,
    check_vocabulary,
    is_quantized,
    load_draft,
    self_draft_is_target,
    split_budget,
)
from pagoda.structured_output.grammar_compiler import GrammarCompiler
from pagoda.structured_output.manager import StructuredOutputManager
from pagoda.worker.model_runner import ModelRunner, Submitted
from pagoda.worker.model_setup import TORCH_DTYPES as TORCH_DTYPES  # re-exported
from pagoda.worker.model_setup import fused_ops as fused_ops  # re-exported
from pagoda.worker.model_setup import (
    invariant_attention,
    prepare_draft,
    prepare_model,
    settle_weights,
)

log = logging.getLogger(__name__)

COMPILE_WAIT_S = 0.005  # with nothing to run but grammars compiling, wait this long per step


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prompt_tokens: int = 0  # admitted prefill tokens, cumulative
    num_generation_tokens: int = 0  # sampled tokens, cumulative
    # speculative decoding, cumulative: verify passes with drafts, drafted and accepted tokens,
    # and accepted tokens by draft position (vLLM's spec_decode counters)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()
    num_embedded_inputs: int = 0  # embedding models: sequences pooled, cumulative


class LLMEngine:
    task = "generate"

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 draft: LoadedModel | None = None):
        """`loaded` / `draft`: already loaded target / draft models to use instead of loading
        them (tests share weights this way); `draft` must be ready (quantized) to run."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = TORCH_DTYPES[config.dtype]
        from pagoda.quant.cli import half_precision_warning

        warning = half_precision_warning(config.device, config.dtype)
        if warning:
            log.warning(warning)
        parallel = config.num_ranks > 1
        if loaded is not None and parallel:
            raise ValueError("tensor and pipeline parallelism cut the model to rank 0's share in "
                             "place: give the engine a model path, not a loaded (shared) model")
        # settled once, before any rank or module reads it
        path = loaded.path if loaded is not None else resolve_model_path(config.model)
        self.config = config = replace(config, quantization=config.quantization_for(
            path, preloaded=loaded is not None))
        self.loaded = loaded or load_model(path, config.device, dtype, config.progress,
                                           file_linears=file_linears(config.quantization))
        if draft is None and config.speculative_method == "hybrid" and self_draft_is_target(
                config, self.loaded.path):
            log.warning("hybrid: the self-draft would have the model's own %s weights, so its "
                        "drafts would cost what the model's tokens cost; drafting by prompt "
                        "lookup only (--speculative-method ngram)", config.quantization)
            self.config = config = replace(config, speculative_method="ngram", draft_model=None)
        self.model_config = cfg = self.loaded.config
        # parallelism: this process is rank 0 and holds its share of the weights
        self.peers = start_peers(config, self.loaded) if parallel else None
        prepare_model(config, self.loaded, whole_layers=self.peers is None
                      or self.peers.whole_layers)
        if self.peers is not None:
            self.peers.attach(self.loaded.model)
        settle_weights(config, self.loaded)
        self.config = config = config.settle_for_weights(is_quantized(self.loaded))
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(config.max_model_len or cfg.max_model_len, cfg.max_model_len)
        kv_memory, draft_memory = config.kv_cache_memory, 0
        if config.uses_draft_model:
            if draft is None:
                draft = load_draft(config, self.loaded, dtype)
            else:
                check_vocabulary(self.loaded, draft)
            kv_memory, draft_memory = split_budget(kv_memory, cfg, draft.config,
                                                   config.resolved_draft_max_batch,
                                                   config.max_num_seqs)
        if draft is not None:
            prepare_draft(config, draft)
            settle_weights(config, draft)
        self.draft = draft
        self.kv_groups = plan_kv_groups(cfg, kv_memory, config.block_size,
                                        config.resolved_kv_dtype, config.max_num_seqs,
                                        config.max_num_batched_tokens)
        self.kv_cache_config = self.kv_groups[0]  # full attention (or the only) group
        self.validator = RequestValidator(self.max_model_len, cfg.vocab_size,
                                          self.kv_cache_config.block_size,
                                          self.kv_cache_config.num_blocks,
                                          tuple(self.tokenizer.eos_token_ids))
        salt = f"{self.loaded.path}|{config.resolved_kv_dtype}|{config.quantization}|{config.dtype}"
        device = torch.device(config.device)
        # under tensor parallelism every rank has the same blocks, each holding its own heads
        self.kv_manager, stores, layer_groups = build_kv(
            self.kv_groups, self.peers.local_config if self.peers else cfg, device, dtype,
            config.enable_prefix_caching, salt, self.peers.stage if self.peers else None)
        invariant = invariant_attention(config, self.loaded)
        if self.peers is not None:
            self.peers.start_runners(self.kv_groups, invariant)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            enable_chunked_prefill=config.enable_chunked_prefill,
            batching=config.batching), self.kv_manager, SpecPolicy(SpecDecodeConfig(
                config.resolved_num_speculative_tokens, config.resolved_speculative_max_batch,
                depth_floor=SPECULATIVE_DEPTH_FLOOR.get(config.speculative_method, 1.0),
                solo_depth_floor=SPECULATIVE_SOLO_DEPTH_FLOOR.get(config.speculative_method),
                solo_num_speculative_tokens=config.resolved_num_speculative_tokens_alone or None)))
        decode_kernel = select_decode_kernel(config.attention_backend, device)
        proposer = build_proposer(config, self.loaded, draft, draft_memory, device,
                                  decode_kernel)
        self.structured = StructuredOutputManager(GrammarCompiler(
            self.tokenizer.hf, cfg.vocab_size, self.tokenizer.eos_token_ids), cfg.vocab_size)
        # constrained requests whose grammar is still compiling: (parent id, request); they join
        # the scheduler when it is ready, so a compile never stalls the batch
        self.compiling: list[tuple[str, Request]] = []
        self.runner = ModelRunner(self.loaded.model, stores, config.block_size, device,
                                  self.tokenizer.eos_token_ids, config.seed, layer_groups,
                                  decode_kernel, invariant, proposer, self.structured,
                                  peers=self.peers,
                                  pipeline=self.peers.pipeline if self.peers else None)
        self.output_processor = OutputProcessor(self.tokenizer)
        # steps submitted and not yet collected, oldest first: at most runner.depth (pipeline
        # stages), and no request in two of them
        self.in_flight: deque[tuple[SchedulerOutput, Submitted]] = deque()
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    # -- requests ----------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return self.validator.encode_prompt(self.tokenizer, prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validator.validate(prompt_token_ids, params)

    def add_request(self, req_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        text, ids = self.encode_prompt(prompt)
        self.add_tokenized_request(req_id, text, ids, params, arrival_time)

    def add_tokenized_request(self, req_id: str, prompt: str | None, prompt_token_ids: list[int],
                              params: SamplingParams, arrival_time: float | None = None) -> None:
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError("params must be SamplingParams")
        self.validate(prompt_token_ids, params)
        arrival = arrival_time or time.monotonic()
        children = self.output_processor.add(req_id, prompt, prompt_token_ids, params, arrival)
        for i, child in enumerate(children):
            request = Request(
                req_id=child, prompt_token_ids=list(prompt_token_ids),
                sampling_params=params.for_sample(i) if params.n > 1 else params,
                eos_token_ids=self.tokenizer.eos_token_ids, max_total_tokens=self.max_model_len,
                sample_index=i, arrival_time=arrival)
            if params.structured_outputs is None:
                self.scheduler.add_request(request)
            else:
                self.structured.add(child, params.structured_outputs)
                self.compiling.append((req_id, request))
        self.num_prompt_tokens += len(prompt_token_ids) * len(children)

    def abort_request(self, req_id: str, reason: str = "abort", error: str | None = None
                      ) -> RequestOutput | None:
        """Abort a request (all its samples); its KV blocks are freed at once."""
        children = self.output_processor.child_ids(req_id)
        for child in children:
            self.scheduler.finish_request(child, reason)
        self.compiling = [(p, r) for p, r in self.compiling if p != req_id]
        busy = self._busy()  # released when their step is collected
        self.runner.release([r for r in self.scheduler.take_finished() + children
                             if r not in busy])
        return self.output_processor.abort(req_id, reason, error)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and submit a batch; collect the oldest once `runner.depth` are in flight
        (or nothing more can start). Depth 1: each step runs its batch to the end."""
        refused = self._admit_compiled()
        sched = self.scheduler.schedule(self._busy(), self._batch_room())
        if not sched.is_empty:
            self.in_flight.append((sched, self.runner.submit(sched)))
        if not self.in_flight or (not sched.is_empty and len(self.in_flight) < self.runner.depth):
            if sched.is_empty and self.compiling:
                self.structured.wait(COMPILE_WAIT_S)
            return refused
        return refused + self._collect(*self.in_flight.popleft())

    def _busy(self) -> set[str]:
        return {r.req_id for sched, _ in self.in_flight for r in sched.scheduled}

    def _batch_room(self) -> int | None:
        """Requests per batch when several are in flight: an equal share of the running ones."""
        depth = self.runner.depth
        if depth == 1:
            return None
        wanted = min(self.scheduler.num_unfinished, self.config.max_num_seqs)
        return max(1, -(-wanted // depth))

    def _collect(self, sched: SchedulerOutput, submitted: Submitted) -> list[RequestOutput]:
        result = self.runner.collect(submitted)
        core_outputs = self.scheduler.update_from_output(sched, result)
        self.num_generation_tokens += sum(len(o.new_token_ids) for o in core_outputs)
        outputs, stopped = self.output_processor.process(core_outputs)
        for child in stopped:
            self.scheduler.finish_request(child, "stop")
        for child, why in result.failed.items():  # the request's fault: its constraints
            parent = self.output_processor.parent_of(child)
            if parent is not None and (out := self.abort_request(
                    parent, "abort", REQUEST_ERROR + why)) is not None:
                outputs.append(out)
        # ended requests, and any the step still computed after an abort had ended them
        busy = self._busy()
        self.runner.release([r for r in self.scheduler.take_finished() if r not in busy] + [
            r.req_id for r in sched.scheduled if r.req_id not in self.scheduler.requests])
        return outputs

    def _admit_compiled(self) -> list[RequestOutput]:
        """Move requests whose grammar compiled into the scheduler; fail those whose grammar
        could not be compiled (the front-end's check makes that rare)."""
        if not self.compiling:
            return []
        waiting, failed = [], {}
        for parent, request in self.compiling:
            ready, error = self.structured.poll(request.req_id)
            if error is not None:  # the constraint's fault: the front-end's check missed it
                failed[parent] = REQUEST_ERROR + error
            elif ready:
                self.scheduler.add_request(request)
            else:
                waiting.append((parent, request))
        self.compiling = waiting
        return [out for parent, error in failed.items()
                if (out := self.abort_request(parent, "abort", error)) is not None]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self.compiling or self.in_flight)

    def stats(self) -> EngineStats:
        spec = self.scheduler.spec.stats
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self.compiling),
            kv_cache_usage=self.kv_manager.usage,
            num_free_blocks=self.kv_manager.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv_manager.num_queried_tokens,
            prefix_cache_hits=self.kv_manager.num_hit_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            spec_num_drafts=spec.num_drafts,
            spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_accepted_per_pos=tuple(spec.accepted_per_pos),
        )

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def close(self) -> None:
        """Stop the parallel workers, if any (they also stop when this process ends)."""
        if self.peers is not None:
            self.peers.close()
            self.peers = None
