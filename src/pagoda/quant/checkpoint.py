"""Quantized checkpoints: one directory with `model.safetensors` and `pagoda_quant.json`.

Layout:
- `model.safetensors`: the model's whole state dict after quantization (quantized buffers and the
  untouched parameters such as embeddings and norms); tensors shared by several names (a tied
  `lm_head` left in fp32) are stored once under their first name.
- `pagoda_quant.json`: {"format": "pagoda-quantized", "version": 1, "model_config": {...},
  "quantization": {...QuantConfig fields}, "modules": {name: spec}, "aliases": {dup: kept}}.

Loading never re-quantizes: the skeleton's linears are replaced by empty modules built from the
specs, then every tensor is assigned from the (memory-mapped) safetensors file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pagoda.quant.config import QuantConfig
from pagoda.quant.swap import manifest, module_from_spec, prepare_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "pagoda_quant.json"
FORMAT = "pagoda-quantized"


def is_quantized_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_quantized(model: nn.Module, out_dir: str, config: QuantConfig | None = None,
                   model_config: Any = None) -> None:
    """Write `model` (already quantized) to `out_dir`.

    `model_config` defaults to `model.config`; a dataclass is stored field by field so the loader
    can rebuild it with `read_model_config`.
    """
    os.makedirs(out_dir, exist_ok=True)
    model_config = getattr(model, "config", None) if model_config is None else model_config
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple[int, int], str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.nbytes)
        if t.nbytes and key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": 1, "model_config": model_config,
            "quantization": dataclasses.asdict(config) if config else None,
            "modules": manifest(model), "aliases": aliases}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Pagoda quantized checkpoint")
    return meta


def read_model_config(path: str, config_cls: type) -> Any:
    """Rebuild the saved model config as `config_cls` (JSON lists become tuples again)."""
    raw = read_checkpoint_meta(path)["model_config"]
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def load_quantized(path: str, model: nn.Module, device: str | torch.device = "cpu",
                   backend: str = "auto", prepare: bool = True) -> nn.Module:
    """Fill `model` (a skeleton of the saved architecture, e.g. built on the meta device) from
    the checkpoint at `path`; returns it on `device`, with kernels packed when `prepare`.

    The caller still rebuilds non-persistent buffers its model computes itself (e.g. RoPE tables
    via `post_load()`), exactly as after an fp32 load.
    """
    meta = read_checkpoint_meta(path)
    for name, spec in meta["modules"].items():
        model.set_submodule(name, module_from_spec(spec, backend))
    state = load_file(os.path.join(path, WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in missing if n not in meta["aliases"]]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for dup, kept in meta["aliases"].items():
        owner, _, attr = dup.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(kept))
    # Non-persistent buffers (not in any state dict) are still on the meta device: allocate them
    # empty, as `to_empty` would, for the caller's post-load step to fill.
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)
    model.to(device)
    if prepare:
        prepare_model(model)
    return model
