"""Test helpers that drive an `LLMEngine` directly."""

from __future__ import annotations

import dataclasses

import torch

from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import LoadedModel, model_class
from pagoda.sampling.params import SamplingParams


def with_sliding_window(loaded: LoadedModel, window: int) -> LoadedModel:
    """The same weights (shared, not copied) in a model whose sliding window is `window`."""
    cfg = dataclasses.replace(loaded.config, sliding_window=window)
    with torch.device("meta"):
        net = model_class(cfg.architecture)(cfg)
    net.load_state_dict(loaded.model.state_dict(), assign=True)
    net.post_load()
    return dataclasses.replace(loaded, model=net.eval(), config=cfg)


def hf_greedy(hf_model, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt (alone, no EOS stop): the reference
    Pagoda's greedy output must equal token for token."""
    refs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            refs.append(out[0, len(ids):].tolist())
    return refs


def run_to_completion(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
                      arrivals: dict[str, int] | None = None, max_steps: int = 100_000
                      ) -> dict[str, list[int]]:
    """Run requests, adding each at its arrival step; returns generated token ids per request."""
    arrivals = arrivals or {}
    pending = dict(requests)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    step = 0
    while pending or engine.has_unfinished_requests():
        for rid in [r for r in pending if arrivals.get(r, 0) <= step]:
            ids, params = pending.pop(rid)
            engine.add_request(rid, ids, params)
        for out in engine.step():
            for o in out.outputs:
                tokens[out.req_id] += o.token_ids
        step += 1
        assert step < max_steps, "engine did not finish"
    return tokens
