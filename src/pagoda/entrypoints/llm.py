"""Offline API in vLLM's shape: `LLM(model=...).generate(prompts, params)`, `.chat(messages)`, and
`.embed(texts)` for embedding models (`LLM(model="all-MiniLM-L6-v2")` or `task="embed"`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pagoda.engine.config import EngineConfig
from pagoda.engine.engine_factory import Engine, build_engine
from pagoda.engine.outputs import CompletionOutput, RequestOutput, merge_delta
from pagoda.engine.request_validator import RequestError
from pagoda.sampling.params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine: Engine = build_engine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = engine, engine.tokenizer
        return llm

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        param_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        order = []
        for prompt, p in zip(prompts, param_list, strict=True):
            req_id = self.engine.new_request_id()
            self.engine.add_request(req_id, prompt, p)
            order.append(req_id)
        return self._run(order, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | None = None, use_tqdm: bool = False
             ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c),
                                         add_special_tokens=False) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def embed(self, texts: str | Sequence[str], truncate: bool = False) -> list[list[float]]:
        """One vector per text, in order (an embedding model only). Texts longer than the
        model's limit raise, unless `truncate` cuts them (keeping their start)."""
        if self.engine.task != "embed":
            raise ValueError("this model generates text; load it with task='embed' to embed")
        texts = [texts] if isinstance(texts, str) else list(texts)
        kwargs = {"truncation": True, "max_length": self.engine.max_model_len} if truncate else {}
        ids = self.tokenizer.hf(texts, **kwargs)["input_ids"] if texts else []
        order = [self.engine.new_request_id() for _ in ids]
        for req_id, seq in zip(order, ids, strict=True):
            self.engine.add_tokenized_request(req_id, None, seq, None)
        vectors: dict[str, list[float]] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.embedding is None:
                    raise RequestError(out.error or "no embedding returned")
                vectors[out.req_id] = out.embedding
        return [vectors[r] for r in order]

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        acc: dict[str, dict[int, CompletionOutput]] = {r: {} for r in order}
        bar = tqdm(total=len(order), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                samples = acc[out.req_id]
                for delta in out.outputs:
                    merge_delta(samples, delta)
                if out.finished:
                    done[out.req_id] = dataclasses.replace(
                        out, outputs=[samples[i] for i in sorted(samples)])
                    bar.update(1)
        bar.close()
        return [done[r] for r in order]

