"""Glue between the model loader and quantization: what the engine and the CLI call.

- `apply_quantization(loaded, "int8")`: quantize an fp32-loaded model in place (`LoadedModel`
  from `pagoda.loader.model_loader`); "gguf" takes the blocks of the GGUF file it was loaded from.
- `load_quantized_model(directory)`: a `LoadedModel` from a `pagoda quantize` output directory
  (model built on the meta device, tensors assigned from safetensors, tokenizer from the folder).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pagoda.quant.checkpoint import load_quantized, read_checkpoint_meta, read_model_config
from pagoda.quant.config import QuantConfig
from pagoda.quant.swap import prepare_model, quantize_model


def config_for(method: str | QuantConfig, model_path: str | None = None,
               **overrides: Any) -> QuantConfig:
    """QuantConfig for a `--quantization` value; "gguf" reads `model_path`'s blocks."""
    if isinstance(method, QuantConfig):
        return method
    if method == "gguf":
        if not model_path or not model_path.endswith(".gguf"):
            raise ValueError("--quantization gguf needs a .gguf model file")
        overrides.setdefault("gguf_path", model_path)
    return QuantConfig(method=method, **overrides)


def apply_quantization(loaded: Any, method: str | QuantConfig, **overrides: Any) -> QuantConfig:
    """Swap `loaded.model`'s linears in place and pack the kernels; returns the config used."""
    config = config_for(method, getattr(loaded, "path", None), **overrides)
    quantize_model(loaded.model, config)
    prepare_model(loaded.model)
    return config


def load_quantized_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                         backend: str = "auto") -> Any:
    """Build a `LoadedModel` from a quantized checkpoint directory."""
    from pagoda.loader.model_loader import LoadedModel, model_class
    from pagoda.loader.tokenizer import Tokenizer
    from pagoda.models.config import ModelConfig

    start = time.perf_counter()
    cfg = read_model_config(path, ModelConfig)
    with torch.device("meta"):
        skeleton = model_class(cfg.architecture)(cfg)
    model = load_quantized(path, skeleton, device=device, backend=backend, prepare=False)
    if hasattr(model, "post_load"):
        model.post_load()
    # Non-quantized parameters follow the requested dtype; quantized modules keep their own.
    model = model.to(dtype=dtype).eval()
    prepare_model(model)  # packing is part of the load time, not of the first request
    tokenizer = Tokenizer.from_pretrained(path, eos_token_ids=cfg.eos_token_ids)
    return LoadedModel(model, cfg, tokenizer, path, time.perf_counter() - start)


def checkpoint_summary(path: str) -> dict[str, Any]:
    meta = read_checkpoint_meta(path)
    return {"quantization": meta["quantization"], "num_modules": len(meta["modules"]),
            "model": (meta["model_config"] or {}).get("name")}

