"""Quality and speed measurements of one loaded model: what `pagoda eval quality` tabulates.

Perplexity and teacher-forced agreement call the model directly with one prefill per window
(no scheduler, no KV reuse), so they measure the weights alone; the decode figures go through
the real engine so they include everything a served request pays for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EVAL_TEXT = "devils_dictionary.txt"  # src/pagoda/data/README.md says where it comes from

# Fixed prompts for greedy agreement (plain completions: no chat template involved).
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, you first",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "In computer science, a linked list is",
    "The best way to learn a new language is",
)


def load_eval_text() -> str:
    return (Path(__file__).parents[1] / "data" / EVAL_TEXT).read_text(encoding="utf-8")


@torch.inference_mode()
def prefill_logits(model: Any, cfg: Any, ids: list[int]) -> torch.Tensor:
    """(T, vocab) fp32 logits of one sequence run as a single fresh prefill."""
    from pagoda.kv_cache.kv_store import make_kv_store
    from pagoda.layers.attention_metadata import AttentionMetadata, PrefillSpan

    # Depends on the engine's KV/attention contracts (kv_store.py, attention_metadata.py).
    n = len(ids)
    block_size = 16
    num_blocks = -(-n // block_size)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kv_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    stores = [make_kv_store(kv_dtype, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                            device, dtype) for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n, device=device), num_decode=0,
                             decode_block_tables=None, decode_context_lens=None,
                             prefills=[PrefillSpan(0, n, 0, None)], block_size=block_size)
    tokens = torch.tensor(ids, device=device)
    hidden = model(tokens, torch.arange(n, device=device), stores, meta)
    return model.compute_logits(hidden).float()


def perplexity(model: Any, cfg: Any, ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) over non-overlapping windows; each window's first token is not scored."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logp = torch.log_softmax(prefill_logits(model, cfg, chunk)[:-1], dim=-1)
        target = torch.tensor(chunk[1:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


def teacher_forced_agreement(model: Any, cfg: Any, sequences: list[tuple[int, list[int]]]
                             ) -> float:
    """Share of positions where the model's argmax equals the reference greedy token.

    sequences: (prompt length, prompt + reference continuation). Teacher forcing keeps one
    early disagreement from counting against every later position.
    """
    same, total = 0, 0
    for prompt_len, ids in sequences:
        pred = prefill_logits(model, cfg, ids).argmax(dim=-1)[prompt_len - 1:-1]
        ref = torch.tensor(ids[prompt_len:])
        same += int((pred == ref).sum())
        total += len(ref)
    return same / total


@dataclass
class DecodeResult:
    token_ids: list[list[int]]
    output_tok_per_s: float
    decode_tok_per_s: float  # after each request's first token: the per-token steady state


def run_engine(engine: Any, prompts: list[str] | list[list[int]], max_tokens: int) -> DecodeResult:
    """Submit all prompts at once, greedy, `max_tokens` each; time the whole run."""
    from pagoda.sampling.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    order = []
    for prompt in prompts:
        req_id = engine.new_request_id()
        engine.add_request(req_id, prompt, params)
        order.append(req_id)
    tokens: dict[str, list[int]] = {r: [] for r in order}
    first_token_at: float | None = None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.req_id] += out.outputs[0].token_ids
            if first_token_at is None and tokens[out.req_id]:
                first_token_at = time.perf_counter()
    end = time.perf_counter()
    num_tokens = sum(len(t) for t in tokens.values())
    steady = max(end - (first_token_at or start), 1e-9)
    return DecodeResult([tokens[r] for r in order], num_tokens / (end - start),
                        (num_tokens - len(order)) / steady)
