"""Turning loaded weights into the model a runner executes: quantize, pack, pick the kernels.

One sequence for the engine's own model and for every tensor-parallel worker's share of it
(parallel/worker.py), so ranks never disagree on a kernel choice: the choices below decide the
arithmetic, and a rank computing differently from another would break the sum of their parts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagoda.kernels import huge_pages
from pagoda.layers.dense_linear import PackedLinear, pack_dense_linears
from pagoda.layers.fused_ops import FusedOps
from pagoda.loader.model_loader import LoadedModel
from pagoda.quant.quant_linear import QuantLinear
from pagoda.spec_decode.setup import is_quantized

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def invariant_attention(config: EngineConfig, loaded: LoadedModel) -> bool:
    """The config's choice, else on exactly when the model's linears are quantized (see
    EngineConfig.invariant_attention): decided from the loaded model, so an engine given
    pre-quantized weights batches as invariantly as one that quantized them itself."""
    if config.invariant_attention is not None:
        return config.invariant_attention
    return is_quantized(loaded)


def fused_ops(choice: bool | None, loaded: LoadedModel, device: str, whole_layers: bool = True
              ) -> FusedOps | None:
    """The C++ elementwise kernels for `loaded` (EngineConfig.fused_ops): `choice`, else on
    when its linears are quantized or fp32 on fgemm (whose bits are not transformers' anyway);
    fp32 linears on torch's or oneDNN's products keep torch's elementwise ops too. Only on the
    CPU, for models that take them. `whole_layers=False` keeps each linear a module call
    (tensor parallelism hooks them)."""
    wanted = (is_quantized(loaded) or any(
        isinstance(m, PackedLinear) and m.kernel == "fgemm" for m in loaded.model.modules())
    ) if choice is None else choice
    if not wanted or device != "cpu" or not hasattr(loaded.model, "use_fused_ops"):
        return None
    ops = FusedOps.load()
    if ops is None and choice:
        raise RuntimeError("--fused-ops on: the C++ kernels could not be built here")
    if ops is not None:
        ops.whole_layers = whole_layers
        log.info("fused decoder layers: on (%s kernels%s)", ops.flavour,
                 "" if whole_layers else ", one call per step, not per layer")
    return ops


def prepare_model(config: EngineConfig, loaded: LoadedModel, whole_layers: bool = True) -> None:
    """Quantize (config.quantization), pack fp32 linears for oneDNN, choose the fused kernels:
    in place, in this order (each step swaps modules the next one looks at)."""
    if config.quantization != "none":
        from pagoda.quant import apply_quantization

        apply_quantization(loaded, config.quantization, backend=config.quant_kernel)
    if config.device == "cpu":  # "torch" unpacks what an engine before packed
        pack_dense_linears(loaded.model, config.dense_kernel)
    if hasattr(loaded.model, "use_fused_ops"):  # a shared model follows this engine
        loaded.model.use_fused_ops(fused_ops(config.fused_ops, loaded, config.device,
                                             whole_layers))


def prepare_draft(config: EngineConfig, draft: LoadedModel) -> None:
    """A draft model (quantized as load_draft made it) takes the target's `--dense-kernel` for
    its fp32 linears and `--fused-ops` for its elementwise steps (auto: as for the target, by
    its own weights)."""
    if config.device == "cpu":
        pack_dense_linears(draft.model, config.dense_kernel)
    if hasattr(draft.model, "use_fused_ops"):
        draft.model.use_fused_ops(fused_ops(config.fused_ops, draft, config.device))


def kernel_tensors(loaded: LoadedModel) -> list[torch.Tensor]:
    """The weight forms the linears' kernels stream, in module order, built now."""
    return [t for m in loaded.model.modules() if isinstance(m, (PackedLinear, QuantLinear))
            for t in m.kernel_tensors()]


def settle_weights(config: EngineConfig, loaded: LoadedModel) -> int:
    """Build every linear's kernel weight form now and move those forms into 2 MiB pages
    (kernels/huge_pages.py) when config.huge_pages; returns the bytes moved. After
    `prepare_model` (which picks the kernels) and after a pipeline stage's cut (so that only the
    stage's own layers move: the moved tensors share one mapping, which lives while any of them
    does). Tensors an earlier engine on the same model moved are already there and stay."""
    if not config.huge_pages or config.device != "cpu":
        return 0
    moved = huge_pages.settle(kernel_tensors(loaded))
    if moved:
        log.info("weights in huge pages: %.0f MiB", moved / 2**20)
    return moved
