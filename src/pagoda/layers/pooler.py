"""Pooling: one vector per sequence from its tokens' last hidden states.

Modes follow sentence-transformers' Pooling module (`1_Pooling/config.json`): mean, cls (first
token), max, mean_sqrt_len (sum / sqrt(length)) and lasttoken; normalize is its Normalize
module (L2, eps 1e-12 like torch's F.normalize). Decoders embedding with `--task embed` use
lasttoken by default (vLLM's default for causal models): under causal attention only the last
token has seen the whole text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, not {self.mode!r}")

    @classmethod
    def from_sentence_transformers(cls, directory: str) -> PoolingConfig | None:
        """Read `modules.json` and the Pooling module's config; None when the directory is not
        in sentence-transformers' layout. Refuses modules this server does not implement
        (a Dense projection, say) rather than returning different vectors."""
        path = os.path.join(directory, "modules.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            modules = json.load(f)
        mode, normalize = None, False
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]
            if kind == "Transformer":
                continue
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                mode = _pooling_mode(os.path.join(directory, module["path"], "config.json"))
            else:
                raise ValueError(f"{directory}: sentence-transformers module {kind!r} is not "
                                 "supported (Transformer, Pooling and Normalize are)")
        if mode is None:
            raise ValueError(f"{directory}: modules.json has no Pooling module")
        return cls(mode, normalize)


_CONFIG_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                "pooling_mode_lasttoken": "lasttoken"}


def _pooling_mode(path: str) -> str:
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("include_prompt") is False:
        raise ValueError(f"{path}: pooling without the prompt (include_prompt false) is not "
                         "supported")
    chosen = [mode for key, mode in _CONFIG_KEYS.items() if cfg.get(key)]
    if len(chosen) != 1:
        raise ValueError(f"{path}: exactly one pooling mode must be on (found {chosen}); "
                         "concatenated modes are not supported")
    return chosen[0]


def pool(hidden: torch.Tensor, lengths: list[int], config: PoolingConfig) -> torch.Tensor:
    """(T, H) packed hidden states of sequences of `lengths` -> (B, H) float32 vectors."""
    out = []
    start = 0
    for n in lengths:
        h = hidden[start:start + n].float()
        start += n
        if config.mode == "mean":
            out.append(h.mean(0))
        elif config.mode == "cls":
            out.append(h[0])
        elif config.mode == "max":
            out.append(h.max(0).values)
        elif config.mode == "mean_sqrt_len":
            out.append(h.sum(0) / n ** 0.5)
        else:
            out.append(h[-1])
    vectors = torch.stack(out)
    return F.normalize(vectors, p=2, dim=1) if config.normalize else vectors
