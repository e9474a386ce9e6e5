"""The engine of an embedding model: pooling scheduler + pooling runner behind one `step()`.

It answers EngineCore the way `LLMEngine` does (add, abort, step, stats), so embedding requests
travel the same command queue, engine loop, thread or process, and AsyncLLM streams as
generation; only the batch policy differs (scheduler/pooling_scheduler.py). A request is added
with `params=None` (an embedding has no sampling parameters) and ends in one output carrying
`embedding`.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import TORCH_DTYPES, EngineStats
from pagoda.engine.outputs import RequestMetrics, RequestOutput
from pagoda.engine.request_validator import RequestError, RequestValidator
from pagoda.layers.dense_linear import pack_dense_linears
from pagoda.layers.pooler import PoolingConfig
from pagoda.loader.encoder_loader import is_encoder_dir, load_encoder
from pagoda.loader.model_loader import LoadedModel, load_model, resolve_model_path
from pagoda.scheduler.pooling_scheduler import PoolingRequest, PoolingScheduler
from pagoda.worker.pooling_runner import PoolingRunner

log = logging.getLogger(__name__)


def wants_embedding(config: EngineConfig) -> bool:
    if config.task != "auto":
        return config.task == "embed"
    return is_encoder_dir(resolve_model_path(config.model))


class EmbeddingEngine:
    task = "embed"

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        """`loaded`: a decoder already loaded (tests share weights this way)."""
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        path = resolve_model_path(config.model)
        if config.speculative_method is not None:
            raise ValueError("speculative decoding does not apply to embedding models")
        if config.num_ranks > 1:
            raise ValueError("tensor and pipeline parallelism are for generation; embedding "
                             "models run in one process (scale them out with replicas)")
        if is_encoder_dir(path):
            if config.quantization not in ("auto", "none") or config.dtype != "fp32":
                raise ValueError("encoder models run in fp32 without quantization here")
            encoder = load_encoder(path, config.device, config.embed_attention)
            self.loaded, pooling = encoder.loaded, encoder.pooling
        else:  # a decoder embedding with its generation weights
            self.loaded = loaded or load_model(path, config.device, TORCH_DTYPES[config.dtype],
                                               config.progress)
            method = config.quantization_for(self.loaded.path, preloaded=loaded is not None)
            if method != "none":
                from pagoda.quant import apply_quantization

                apply_quantization(self.loaded, method, backend=config.quant_kernel)
            if config.device == "cpu":  # "torch" unpacks what an engine before packed
                pack_dense_linears(self.loaded.model, config.dense_kernel)
            pooling = PoolingConfig("lasttoken", True)
        if config.pooling is not None:
            pooling = PoolingConfig(config.pooling, pooling.normalize)
        self.pooling = pooling
        self.model_config = cfg = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(config.max_model_len or cfg.max_model_len, cfg.max_model_len,
                                 config.max_num_batched_tokens)
        # generation checks never run here (the server refuses generation first); the pool
        # size only feeds /debug/kv, which reports no KV cache
        self.validator = RequestValidator(self.max_model_len, cfg.vocab_size, 1, 1)
        self.scheduler = PoolingScheduler(config.max_num_batched_tokens, config.max_num_seqs)
        self.runner = PoolingRunner(self.loaded.model, pooling, torch.device(config.device))
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_embedded = 0
        log.info("embedding model %s: %s pooling%s, up to %d tokens per input", path,
                 pooling.mode, ", normalized" if pooling.normalize else "", self.max_model_len)

    # -- requests ----------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"embd-{next(self._ids)}"

    def check(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise RequestError("input must not be empty", "input")
        if len(token_ids) > self.max_model_len:
            raise RequestError(f"this model embeds at most {self.max_model_len} tokens; the "
                               f"input has {len(token_ids)}", "input")
        if any(t < 0 or t >= self.model_config.vocab_size for t in token_ids):
            raise RequestError("token ids must be in [0, "
                               f"{self.model_config.vocab_size})", "input")

    def add_tokenized_request(self, req_id: str, prompt: str | None, prompt_token_ids: list[int],
                              params: object, arrival_time: float | None = None) -> None:
        if params is not None:
            raise RequestError("this is an embedding model: it does not generate text")
        self.check(prompt_token_ids)
        self.scheduler.add(PoolingRequest(req_id, prompt, list(prompt_token_ids),
                                          arrival_time or time.monotonic()))

    def abort_request(self, req_id: str, reason: str = "abort", error: str | None = None
                      ) -> RequestOutput | None:
        if not self.scheduler.abort(req_id):
            return None
        return RequestOutput(req_id, None, [], [], True, None, error)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        started = time.monotonic()
        vectors = self.runner.embed([r.token_ids for r in batch])
        done = time.monotonic()
        self.num_prompt_tokens += sum(len(r.token_ids) for r in batch)
        self.num_embedded += len(batch)
        return [RequestOutput(
            r.req_id, r.prompt, r.token_ids, [], True,
            RequestMetrics(r.arrival_time, first_scheduled_time=started, first_token_time=done,
                           last_token_time=done, finished_time=done),
            embedding=vector.tolist()) for r, vector in zip(batch, vectors, strict=True)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_waiting > 0

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=self.scheduler.num_waiting,
                           kv_cache_usage=0.0, num_free_blocks=0, num_preemptions=0,
                           prefix_cache_queries=0, prefix_cache_hits=0,
                           num_prompt_tokens=self.num_prompt_tokens,
                           num_embedded_inputs=self.num_embedded)

    def check_integrity(self) -> None:
        return None  # nothing outlives a step
