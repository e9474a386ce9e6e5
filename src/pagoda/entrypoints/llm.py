"""Offline API in vLLM's shape: `LLM(model=...).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.outputs import CompletionOutput, RequestOutput, merge_delta
from pagoda.sampling.params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
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

