"""Glue between the model loader and quantization: what the engine and the CLI call.

- `apply_quantization(loaded, "int8")`: quantize an fp32-loaded model in place (`LoadedModel`
  from `pagoda.loader.model_loader`); "gguf" takes the blocks of the GGUF file it was loaded from.
(`pagoda.loader.model_loader.load_quantized_model` reads a `pagoda quantize` directory back; the
loader imports quant, never the reverse.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pagoda.quant.checkpoint import read_checkpoint_meta
from pagoda.quant.config import QuantConfig
from pagoda.quant.swap import linear_kind, prepare_model, quantize_model


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


def file_linears(method: str) -> Callable[[str], bool] | None:
    """For "gguf": which linears (by module name) `apply_quantization` rebuilds from the file's
    own blocks, so `load_model(file_linears=...)` need not read their fp32 weights; None for
    methods that quantize the loaded weights."""
    if method != "gguf":
        return None
    config = QuantConfig(method="gguf", gguf_path="(the model file)")
    return lambda module_name: config.wants(linear_kind(module_name))


def apply_quantization(loaded: Any, method: str | QuantConfig, **overrides: Any) -> QuantConfig:
    """Swap `loaded.model`'s linears in place and pack the kernels; returns the config used."""
    config = config_for(method, getattr(loaded, "path", None), **overrides)
    quantize_model(loaded.model, config)
    prepare_model(loaded.model)
    return config


def checkpoint_summary(path: str) -> dict[str, Any]:
    meta = read_checkpoint_meta(path)
    return {"quantization": meta["quantization"], "num_modules": len(meta["modules"]),
            "model": (meta["model_config"] or {}).get("name")}

