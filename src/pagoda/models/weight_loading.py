"""Loading HF-named checkpoint tensors into models whose q/k/v and gate/up projections are fused.

Every architecture shares this: HF checkpoints keep `q_proj`, `k_proj`, `v_proj`, `gate_proj` and
`up_proj` separate, while Pagoda's models run one matmul each for `qkv_proj` and `gate_up_proj`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.models.config import ModelConfig

# HF checkpoint name fragment -> (our fused parameter fragment, shard index)
STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def shard_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "qkv_proj":
        kv = cfg.num_kv_heads * cfg.head_dim
        return [cfg.num_heads * cfg.head_dim, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _stacked(hf_name: str) -> tuple[str, str, int] | None:
    """(HF fragment, fused fragment, shard index) when the tensor is one shard of a fused
    projection, else None."""
    for part, (fused, shard) in STACKED.items():
        if f".{part}." in hf_name:
            return part, fused, shard
    return None


def fused_param_name(hf_name: str) -> str:
    """The model parameter an HF-named checkpoint tensor is copied into (q/k/v and gate/up into
    their fused projections)."""
    name = hf_name.removeprefix("model.")
    stacked = _stacked(name)
    return name.replace(stacked[0], stacked[1]) if stacked else name


def load_fused_weights(model: nn.Module, cfg: ModelConfig,
                       weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy every (hf_name, tensor) into `model`; raises on unexpected or missing weights."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    # Writes go through the parameters themselves (not `.data`), so each bumps its version
    # counter: what packed copies of a weight (PackedLinear, the one-call decode stack) check
    # to notice new weights loaded into a served model.
    with torch.no_grad():
        _copy_weights(params, cfg, weights, loaded)
    # A parameter still on the meta device was left there on purpose: its linear is replaced by
    # one built from the file's own blocks (load_model's `file_linears`).
    missing = {n for n, p in params.items() if n not in loaded and not p.is_meta}
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")


def _copy_weights(params: dict[str, nn.Parameter], cfg: ModelConfig,
                  weights: Iterable[tuple[str, torch.Tensor]], loaded: set[str]) -> None:
    for hf_name, tensor in weights:
        name = fused_param_name(hf_name)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stacked = _stacked(hf_name)
        if stacked is not None:
            _, fused, shard = stacked
            sizes = shard_sizes(cfg, fused)
            offset = sum(sizes[:shard])
            params[name][offset:offset + sizes[shard]].copy_(tensor)
        else:
            if name not in params:
                raise ValueError(f"unexpected weight {hf_name} in checkpoint")
            params[name].copy_(tensor)
        loaded.add(name)
