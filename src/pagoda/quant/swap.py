"""`quantize_model`: replace a model's `nn.Linear` modules by quantized ones, in place.

The model file never changes: linears are found by type and classified by the last component of
their module name (`LINEAR_KINDS`), and `QuantConfig` decides per kind. Modules other than
`nn.Linear` (embedding, norms) are untouched; a tied `lm_head` that is quantized gets its own
quantized copy while the embedding keeps the full-precision table.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pagoda.quant.config import QuantConfig
from pagoda.quant.gguf_source import GGUFWeightSource
from pagoda.quant.group_linear import GroupLinear
from pagoda.quant.half_linear import HalfLinear
from pagoda.quant.int8_linear import Int8Linear
from pagoda.quant.kernel_plan import describe
from pagoda.quant.quant_linear import QuantLinear

log = logging.getLogger(__name__)


def linear_kind(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def quantize_model(model: nn.Module, config: QuantConfig,
                   gguf_source: GGUFWeightSource | None = None) -> nn.Module:
    """Swap every `nn.Linear` whose kind `config` wants; returns the same (mutated) model.

    `gguf_source` lets a caller reuse an opened file (parsing SmolLM2's metadata takes seconds).
    """
    if config.method == "none":
        return model
    source = None
    if config.method == "gguf":
        source = gguf_source or GGUFWeightSource(config.gguf_path)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and config.wants(linear_kind(name))]
    for name, linear in targets:
        replacement = _quantize_linear(name, linear, config, source)
        # A meta skeleton (gguf needs no loaded weights) gets its quantized modules on the CPU.
        device = "cpu" if linear.weight.is_meta else linear.weight.device
        model.set_submodule(name, replacement.to(device))
    return model


def _quantize_linear(name: str, linear: nn.Linear, config: QuantConfig,
                     source: GGUFWeightSource | None) -> QuantLinear:
    if linear.bias is not None:
        raise ValueError(f"{name}: quantized linears are bias-free by the model contract")
    if linear.weight.is_meta and source is None:
        raise ValueError(f"{name}: weights are on the meta device; load them before quantizing")
    kind = linear_kind(name)
    if config.method == "int8":
        return Int8Linear.from_linear(linear, config.backend, config.reduce_range,
                                      config.outlier_ratio)
    if config.method == "int4":
        return GroupLinear.from_linear(linear, config.group_size, config.backend,
                                       config.reduce_range, config.outlier_ratio)
    if config.method in ("fp16", "bf16"):
        return HalfLinear.from_linear(linear, config.method, config.backend)
    assert source is not None
    weights, qtypes = source.weights_for(name, kind)
    part = getattr(linear, "weight_slice", None)  # a tensor-parallel shard of the file's matrix
    if part is not None:
        weights = weights.take(part)
    expected = (linear.out_features, linear.in_features)
    if weights.shape != expected:
        raise ValueError(f"{name}: GGUF gives {weights.shape}, the model has {expected}")
    return GroupLinear(weights, "gguf", config.backend, config.reduce_range, source=qtypes,
                       outlier_ratio=config.outlier_ratio)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """module name -> spec of every quantized linear (what a checkpoint must rebuild)."""
    return {name: m.spec() for name, m in quantized_modules(model).items()}


def module_from_spec(spec: dict[str, Any], backend: str = "auto") -> QuantLinear:
    method = spec["method"]
    if method == "int8":
        return Int8Linear.from_spec(spec, backend)
    if method in ("int4", "gguf"):
        return GroupLinear.from_spec(spec, backend)
    if method in ("fp16", "bf16"):
        return HalfLinear.from_spec(spec, backend)
    raise ValueError(f"unknown quantized module method {method!r}")


def prepare_model(model: nn.Module) -> list[str]:
    """Resolve every quantized linear's kernel and build its weight form now (otherwise done at
    its first call); logs and returns the plan, a line per (format, kernel)."""
    choices = {name: (m.weight_format(), m.prepare())
               for name, m in quantized_modules(model).items()}
    lines = describe(choices)
    for line in lines:
        log.info("kernel plan: %s", line)
    return lines


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by linear weights: stored buffers, packed kernel copies, and fp32 linears."""
    stored = sum(m.stored_bytes() for m in quantized_modules(model).values())
    packed = sum(m.packed_bytes() for m in quantized_modules(model).values())
    seen: set[int] = set()
    dense = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            dense += m.weight.nbytes
    return {"quantized_stored": stored, "quantized_packed": packed, "dense_linear": dense,
            "total": stored + packed + dense}


def all_parameter_bytes(model: nn.Module) -> int:
    """Every parameter and buffer once (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
