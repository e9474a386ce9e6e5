"""fp32 linears through oneDNN with weights reordered once, instead of MKL's sgemm.

Measured on AMD EPYC (docs/benchmarks.md): torch's default fp32 product (MKL) takes a slow path on
AMD CPUs at small row counts (4-12 GFLOP/s for 1-5 rows against a 49152 x 576 LM head), while
oneDNN's JIT kernels on a weight reordered into their blocked layout stream the same weights
1.4-2.5x faster across 1-256 rows, on AVX-512 and on AVX2. Decode (1 row per request) and
speculative verification (a few rows) are exactly where MKL is weakest.

`PackedLinear` stays an `nn.Linear` (its `weight` parameter is kept, so quantization, checkpoints
and weight tying see an ordinary Linear); the reordered copy costs the weights' size once more.
The copy is rebuilt if the weight tensor is replaced or changes dtype or device.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACK_ROWS = 64  # row-count hint for the reorder; measured best over 1-256 rows (see above)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise")


class PackedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, device="meta")
        self._packed: torch.Tensor | None = None
        self._packed_of: tuple[int, torch.dtype, torch.device, int] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        assert linear.bias is None, "the model contract has bias-free linears"
        packed = cls(linear.in_features, linear.out_features)
        packed.weight = linear.weight  # shared, so a tied embedding stays tied
        return packed

    def _key(self) -> tuple[int, torch.dtype, torch.device, int]:
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # an inference-mode tensor: cannot change in place anyway
            version = 0
        return (w.data_ptr(), w.dtype, w.device, version)

    def _usable(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
                and w.device.type == "cpu" and not torch.is_grad_enabled())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(x):
            return nn.functional.linear(x, self.weight)
        if self._packed is None or self._packed_of != self._key():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                                   PACK_ROWS)
            self._packed_of = self._key()
        flat = x.reshape(-1, self.in_features).contiguous()  # (T, in)
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, None, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_dense_linears(model: nn.Module) -> int:
    """Swap every plain fp32 CPU `nn.Linear` of `model` for a `PackedLinear` (in place);
    returns how many. Quantized modules are not `nn.Linear` and are left alone."""
    if not onednn_available():
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu"]
    for name, linear in targets:
        model.set_submodule(name, PackedLinear.from_linear(linear))
    if targets:
        log.info("dense kernel: oneDNN (reordered weights) for %d fp32 linears", len(targets))
    return len(targets)
