"""`QuantLinear`: the base of every module that replaces an `nn.Linear` (bias-free).

Contract shared by all subclasses:
- `forward(x)` takes (T, in_features) in any float dtype and returns (T, out_features) in x's dtype.
  The kernel is chosen once per module and device from the table in `kernel_plan.py`: on CPUs
  Pagoda's igemm (`kernels/igemm.py`: 4-bit weights, activations rounded per 32-element block,
  a tiled integer GEMM), wgemm (`kernels/wgemm.py`: the integers widened to fp32 in registers,
  fp32 activations) or qgemm (`kernels/qgemm.py`: igemm's rounding as a GEMV over the stored
  blocks), all batch-invariant for every row count; elsewhere the portable dequantize +
  `F.linear`.
- Forced "onednn" / "fbgemm" run those libraries' packed int8 GEMMs. Their activations are
  quantized per token (one scale per row), and input columns whose magnitude exceeds
  `outlier_ratio` times the median column go through an exact fp32 product with just those
  weight columns (LLM.int8()-style). SmolLM2's down_proj input has a token whose largest value
  is ~2000x the typical row's, which would flatten a per-tensor scale. The split depends on the
  batch, so on these paths a token's rounding is not batch-invariant.
- Quantized modules own their dtypes: `model.to(dtype)` / `.half()` move them between devices but
  never cast their buffers (a bf16 cast of the scales would silently lose precision).
- Every kernel form (packed library weights, fp32 scale copies) is a cache derived from the
  buffers, rebuilt after any move or load; only the buffers are saved (`spec()` describes their
  shapes so `from_spec` can rebuild them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.kernels import igemm as igemm_kernel
from pagoda.kernels import wgemm as wgemm_kernel
from pagoda.kernels.qgemm import QGemmWeight, qgemm
from pagoda.quant import int8_ops
from pagoda.quant.int8_ops import quantize_rows
from pagoda.quant.kernel_plan import KernelChoice, WeightFormat, choose
from pagoda.quant.kernels import (
    int8_kernel,
    int8_linear_fbgemm,
    int8_linear_onednn,
    linear_reference,
    pack_int8,
    pack_int8_onednn,
)

OUTLIER_ROWS = 64  # cached fp32 weight rows of outlier input columns, per module

# Pagoda's own kernels: how each turns the stored integers (qgemm's form) into the form it reads,
# and its product. qgemm reads the stored integers in place.
NATIVE: dict[str, tuple[Callable[[QGemmWeight], Any], Callable[..., torch.Tensor]]] = {
    "igemm": (igemm_kernel.pack, igemm_kernel.igemm),
    "wgemm": (wgemm_kernel.pack, wgemm_kernel.wgemm),
    "qgemm": (lambda w: w, qgemm),
}


@dataclass(frozen=True)
class Packed:
    """A weight in the form one kernel multiplies with, tagged by that kernel's name."""

    kernel: str  # "onednn" | "fbgemm" | a subclass's own
    weight: object


class QuantLinear(nn.Module):
    method: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto",
                 reduce_range: bool = False, outlier_ratio: float = 5.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.reduce_range = reduce_range
        self.outlier_ratio = outlier_ratio  # 0 disables the outlier-column split
        self._packed: Packed | None = None
        self._packed_for = ""  # the `int8_kernel` choice _packed was built under
        self._outlier_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outlier_rows: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._choice: tuple[torch.device, KernelChoice] | None = None
        self._native: tuple[str, Any] | None = None  # (kernel, its weight form): one at a time

    # --- what subclasses provide -------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this module computes with, in `dtype` (reference path)."""
        raise NotImplementedError

    def int8_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) int8 values and (N,) scales that the fbgemm path multiplies with."""
        raise NotImplementedError

    def dequantize_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """(N, len(cols)) fp32 weight columns, for the exact product of outlier inputs."""
        return self.dequantize()[:, cols]

    def weight_format(self) -> WeightFormat | None:
        """The format the kernel table looks up (None: not an integer format)."""
        return None

    def make_qgemm_weight(self) -> QGemmWeight:
        """The stored integers as qgemm reads them, with fp32 scales/offsets."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description that `from_spec` turns back into an empty module."""
        return {"method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "reduce_range": self.reduce_range,
                "outlier_ratio": self.outlier_ratio}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], backend: str = "auto") -> QuantLinear:
        raise NotImplementedError

    # --- shared machinery ----------------------------------------------------------------------
    def __setattr__(self, name: str, value: object) -> None:
        # A model's post-load step may re-tie `lm_head.weight` to the embedding. A quantized head
        # owns its weights, so that tie must neither replace them (HalfLinear's `weight` buffer)
        # nor hang a stray fp32 parameter on the module.
        if name == "weight" and isinstance(value, nn.Parameter):
            return
        super().__setattr__(name, value)

    def pack(self, kernel: str) -> Packed:
        qweight, scale = self.int8_form()
        if kernel == "onednn":
            return Packed(kernel, pack_int8_onednn(qweight, scale))
        return Packed(kernel, pack_int8(qweight, scale))

    def run_packed(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        if packed.kernel == "fbgemm" and x.shape[0] == 1:
            # one row: fbgemm's own per-tensor scale is already per token
            return int8_linear_fbgemm(x, packed.weight, self.reduce_range)
        # oneDNN takes the int8 rows; fbgemm quantizes per tensor, so it gets the rows scaled to
        # a common maximum (they then quantize as if each had its own scale; y = W x is linear
        # in each row). Either way the product is rescaled per row afterwards.
        onednn = packed.kernel == "onednn"
        rows = quantize_rows(x, self.outlier_ratio if x.shape[0] > 1 else 0.0, to_int8=onednn)
        y = (int8_linear_onednn(rows.q, packed.weight) if onednn
             else int8_linear_fbgemm(rows.q, packed.weight, self.reduce_range))
        y.mul_(rows.scale)
        if rows.cols.numel():
            y.addmm_(rows.x_cols, self._outlier_weight(rows.cols))
        return y.to(x.dtype)

    def _outlier_weight(self, cols: torch.Tensor) -> torch.Tensor:
        """(len(cols), N) fp32 weight rows for the outlier inputs.

        Outlier channels are systematic feature dimensions, so the same few columns recur while
        the exact set changes from batch to batch (75% of calls in a 32-request gguf run). Each
        column's row is dequantized once and kept (at most OUTLIER_ROWS per module, least
        recently used evicted); the last stacked set is kept too, for the common repeat."""
        last = self._outlier_cache
        if last is not None and torch.equal(last[0], cols):
            return last[1]
        rows = self._outlier_rows
        wanted = cols.tolist()
        missing = [c for c in wanted if c not in rows]
        if missing:
            block = self.dequantize_columns(torch.tensor(missing, device=cols.device)).T
            for c, row in zip(missing, block, strict=True):
                rows[c] = row.contiguous()
        stacked = torch.stack([rows[c] for c in wanted])
        for c in wanted:
            rows.move_to_end(c)
        while len(rows) > OUTLIER_ROWS:  # may evict some of `wanted` if there are more
            rows.popitem(last=False)
        self._outlier_cache = (cols, stacked)
        return stacked

    def kernel_choice(self, device: torch.device) -> KernelChoice:
        """This module's row of the kernel table on `device`, resolved once per device."""
        if self._choice is None or self._choice[0] != device:
            fmt = self.weight_format()
            choice = (choose(fmt, device, self.backend) if fmt is not None
                      else KernelChoice(int8_kernel(device, self.backend)))
            self._choice = (device, choice)
        return self._choice[1]

    def native_weight(self, kernel: str) -> Any:
        """The stored integers in the form Pagoda's `kernel` reads (built once; the form of
        another kernel is not kept)."""
        if self._native is None or self._native[0] != kernel:
            self._native = (kernel, NATIVE[kernel][0](self.make_qgemm_weight()))
        return self._native[1]

    def built_form(self, kernel: str) -> Any:
        """`kernel`'s weight form if it is built, else None."""
        return self._native[1] if self._native and self._native[0] == kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.kernel_choice(x.device)
        if choice.kernel in NATIVE:
            run = NATIVE[choice.kernel][1]
            return run(x, self.native_weight(choice.kernel), choice.flavour).to(x.dtype)
        if choice.kernel == "reference":
            return linear_reference(x, self.dequantize(x.dtype))
        if self._packed is None or self._packed_for != choice.kernel:
            self._packed, self._packed_for = self.pack(choice.kernel), choice.kernel
        return self.run_packed(x, self._packed)

    def native_operands(self, device: torch.device) -> tuple[str, object, str] | None:
        """(kernel, weight, flavour) when this module's products run on Pagoda's own igemm,
        wgemm or qgemm on `device`, else None: what a fused layer needs to call the kernel."""
        choice = self.kernel_choice(device)
        if choice.kernel in NATIVE:
            return choice.kernel, self.native_weight(choice.kernel), choice.flavour
        return None

    def prepare(self) -> KernelChoice:
        """Resolve the kernel and build its weight form now rather than at the first forward
        (which also compiles the C++ kernels at load, not in the first request)."""
        choice = self.kernel_choice(self.device)
        if choice.kernel in NATIVE:
            self.native_weight(choice.kernel)
        elif choice.kernel in ("onednn", "fbgemm") and self._packed is None:
            self._packed, self._packed_for = self.pack(choice.kernel), choice.kernel
            int8_ops.extension()
        return choice

    def kernel_tensors(self) -> list[torch.Tensor]:
        """The tensors a forward streams, built now (`prepare`): the native kernel's weight
        form, the library's packed tensor, or the stored buffers for the portable path."""
        choice = self.prepare()
        if choice.kernel in NATIVE:
            form = self.native_weight(choice.kernel)
            return [getattr(form, f.name) for f in fields(form)
                    if isinstance(getattr(form, f.name), torch.Tensor)]
        if self._packed is not None and isinstance(self._packed.weight, torch.Tensor):
            return [self._packed.weight]
        return [b for b in self._buffers.values() if b is not None]

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def stored_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values() if b is not None)

    def packed_bytes(self) -> int:
        """Approximate size of the kernel's own weight copy (0 before it is built): a packed
        library weight holds a byte per weight; wgemm and igemm a repacked copy of the integers
        and their scales; qgemm only keeps fp32 copies of fp16 scales."""
        if self._packed is not None:
            return self.in_features * self.out_features
        if self._native is None:
            return 0
        kernel, w = self._native
        if kernel != "qgemm":
            return w.q.nbytes + w.scales.nbytes + w.offsets.nbytes
        extra = [t for t in (w.scales, w.offsets) if t is not None]
        return sum(t.nbytes for t in extra if all(t.data_ptr() != b.data_ptr()
                                                  for b in self._buffers.values()
                                                  if b is not None))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # Learn the target device from a probe and move buffers without changing their dtype.
        # A dtype-only cast is a no-op, so it keeps the packed kernels too.
        target = fn(torch.zeros(0, device=self.device)).device
        if target == self.device and not any(b.is_meta for b in self._buffers.values()
                                             if b is not None):
            return self
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            self._buffers[name] = (torch.empty_like(buf, device=target) if buf.is_meta
                                   else buf.to(target))
        self.invalidate()
        return self

    def invalidate(self) -> None:
        """Drop every cache derived from the buffers (subclasses add theirs)."""
        self._packed = None
        self._outlier_cache = None
        self._outlier_rows = OrderedDict()
        self._choice = None
        self._native = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.invalidate()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}"
