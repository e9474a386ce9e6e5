"""Build the proposer an `EngineConfig` asks for, and split the KV budget with a draft model.

A draft model must share the target's vocabulary: the same vocabulary size and the same token
for every id (its tokenizer's vocabulary equal to the target's). Anything else is refused at
start-up with the first difference named, since draft ids would mean other tokens to the target.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagoda.kv_cache.kv_setup import build_kv, plan_kv_groups
from pagoda.layers.decode_backend import DecodeKernel
from pagoda.loader.model_loader import LoadedModel, load_model, resolve_model_path
from pagoda.models.config import ModelConfig
from pagoda.spec_decode.draft_model import DraftModelProposer
from pagoda.spec_decode.hybrid import DRAFT_DEPTH, HybridProposer
from pagoda.spec_decode.ngram import NgramProposer
from pagoda.spec_decode.proposer import Proposer
from pagoda.worker.model_runner import ModelRunner

if TYPE_CHECKING:  # annotations only: the engine builds on this module, not the reverse
    from pagoda.engine.config import EngineConfig

log = logging.getLogger(__name__)


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """K and V of one token over every layer, at 4 bytes per element (for the budget split)."""
    return cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4


def split_budget(memory: int, target: ModelConfig, draft: ModelConfig, max_batch: int,
                 max_num_seqs: int) -> tuple[int, int]:
    """(target bytes, draft bytes) of one KV budget.

    Only requests that speculate need draft K/V, and speculation runs while at most `max_batch`
    requests run: the draft gets the share that would give both caches the same number of tokens,
    scaled by max_batch / max_num_seqs but never under a quarter of it (a lone long-context user
    is the case speculation serves best). The draft evicts the state of requests that are not
    speculating when its pool runs short (draft_model.py). Measured: an even split cost 31% of
    the W1 throughput (32 concurrent) through preemptions of the target (docs/spec_decode.md).
    """
    t, d = kv_bytes_per_token(target), kv_bytes_per_token(draft)
    scale = min(1.0, max(0.25, max_batch / max_num_seqs))
    draft_bytes = int(memory * d // (t + d) * scale)
    return memory - draft_bytes, draft_bytes


def draft_weights(config: EngineConfig, draft_path: str) -> str:
    """The quantization the draft model gets (`draft_quantization`, auto resolved)."""
    quant = config.draft_quantization
    if quant == "auto":
        quant = "gguf" if draft_path.endswith(".gguf") else "int4"
    return quant


def self_draft_is_target(config: EngineConfig, target_path: str) -> bool:
    """True when the draft is the model itself with the model's own (settled) weights."""
    return ((config.draft_model or "self") == "self"
            and draft_weights(config, target_path) == config.quantization)


def load_draft(config: EngineConfig, target: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """The draft model of `config` (speculative_method "draft" or "hybrid"), loaded and
    quantized."""
    from pagoda.quant import apply_quantization, file_linears

    name = config.draft_model or "self"
    path = target.path if name == "self" else resolve_model_path(name)
    quant = draft_weights(config, path)
    draft = load_model(path, config.device, dtype, progress=False,
                       file_linears=file_linears(quant))
    if self_draft_is_target(config, target.path):
        log.warning("the self-draft has the target's own %s weights: each draft token costs "
                    "what a target token costs, so speculation can only slow this engine down "
                    "(use --speculative-method ngram, or a cheaper --draft-model)", quant)
    if quant != "none":
        apply_quantization(draft, quant, backend="auto")
    check_vocabulary(target, draft)
    log.info("draft model: %s (%s weights)", "self" if name == "self" else draft.path, quant)
    return draft


def check_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft model vocabulary size {draft.config.vocab_size} differs from "
                         f"the target's {target.config.vocab_size}")
    ours, theirs = target.tokenizer.raw.get_vocab(), draft.tokenizer.raw.get_vocab()
    if ours != theirs:
        by_id = {i: t for t, i in ours.items()}
        for token, i in sorted(theirs.items(), key=lambda kv: kv[1]):
            if by_id.get(i) != token:
                raise ValueError(f"draft model tokenizer differs from the target's: id {i} is "
                                 f"{token!r} in the draft, {by_id.get(i)!r} in the target")
        raise ValueError("draft model tokenizer differs from the target's (extra tokens)")


def build_proposer(config: EngineConfig, target: LoadedModel, draft: LoadedModel | None,
                   draft_memory: int, device: torch.device, decode_kernel: DecodeKernel | None
                   ) -> Proposer | None:
    if config.speculative_method is None:
        return None
    lookup = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative_method == "ngram":
        return lookup
    assert draft is not None
    cfg = draft.config
    dtype = next(p for p in draft.model.parameters() if p.is_floating_point()).dtype
    groups = plan_kv_groups(cfg, draft_memory, config.block_size, config.resolved_kv_dtype,
                            config.max_num_seqs, config.max_num_batched_tokens)
    kv, stores, layer_groups = build_kv(groups, cfg, device, dtype, False, "draft")
    runner = ModelRunner(draft.model, stores, config.block_size, device,
                         draft.tokenizer.eos_token_ids, config.seed, layer_groups, decode_kernel,
                         invariant_attention=is_quantized(draft), score_prompts=False)
    model = DraftModelProposer(runner, kv)
    if config.speculative_method == "hybrid":
        depth = min(DRAFT_DEPTH, config.resolved_num_speculative_tokens)
        return HybridProposer(lookup, model, depth)
    return model


def is_quantized(loaded: LoadedModel) -> bool:
    """True when the model has quantized linears, whichever way they were made."""
    from pagoda.quant import quantized_modules

    return bool(quantized_modules(loaded.model))
