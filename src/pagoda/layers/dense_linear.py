"""fp32 linears on CPUs: pagoda's `fgemm` kernel, or oneDNN with weights reordered once, instead
of MKL's sgemm.

`fgemm` (kernels/fgemm.py; what `auto` runs where its avx2/avx512 build runs): every output is
one fixed chain of fmas whatever the row count, so a row's bits never depend on its batch and
every ISA flavour gives the same ones; up to a dozen rows share each weight load. The 121
linears of SmolLM2 on a 2-core Xeon (docs/benchmarks.md, "fgemm"), fgemm / oneDNN / MKL: 1 row
19.0 / 34.6 / 21.1 ms, 9 rows (a verification) 24.1 / 39.2 / 52.0, 256 rows 225 / 213 / 224;
fgemm's avx2 build against oneDNN capped at AVX2: 1 row 21.0 / 35.1, 9 rows 34.0 / 51.4, 256
rows 357 / 329. Prefill-sized products run at ~90% of oneDNN's speed; fgemm takes them too, so
that a decode row batched with a prefill gets the bits it gets alone.

oneDNN (`--dense-kernel onednn`), measured on AMD EPYC (docs/benchmarks.md): torch's default
fp32 product (MKL) takes a slow path on AMD CPUs at small row counts (4-12 GFLOP/s for 1-5 rows
against a 49152 x 576 LM head), while oneDNN's JIT kernels on a weight reordered into their
blocked layout stream the same weights 1.4-2.5x faster across 1-256 rows, on AVX-512 and on
AVX2.

`PackedLinear` stays an `nn.Linear` (its `weight` parameter is kept, so quantization, checkpoints
and weight tying see an ordinary Linear); the kernel's copy (fgemm's blocks or oneDNN's
reordered weights) costs the weights' size once more.
The copy is rebuilt if the weight tensor is replaced or changes dtype or device.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pagoda.kernels import build
from pagoda.kernels.fgemm import FGemmWeight, pack

log = logging.getLogger(__name__)

PACK_ROWS = 64  # row-count hint for the reorder; measured best over 1-256 rows (see above)
# oneDNN builds (and caches, up to 1,024 entries) one primitive per (weight shape, row count),
# ~0.6 MB each here. A server sees every row count from 1 to max_num_batched_tokens, so the cache
# thrashed at its bound (~600 MB) and the primitives it freed fragmented the heap beyond that
# (a 1,000-request soak: RSS +32%, still growing). Row counts up to EXACT_ROWS (decode batches,
# verification, small prefills) run as they are; larger ones are padded to a multiple of
# ROW_BUCKET (at most ROW_BUCKET - 1 zero rows, < 5% of a 2,048-row chunk), so oneDNN sees at
# most EXACT_ROWS + max_num_batched_tokens / ROW_BUCKET row counts per weight shape and its
# cache stops churning (~400 MB at most for SmolLM2, reached once). Throughput unchanged within
# this VM's noise (offline, 64 mixed requests, 4 interleaved runs each: median 148.6 vs 148.3
# output tok/s).
EXACT_ROWS = 128
ROW_BUCKET = 64
# Fewer rows than this are padded with zero rows when oneDNN runs its AVX-512 kernels. There its
# fp32 brgemm blocks a single row differently: SmolLM2's down projection (K = 1536) came out in
# other bits at one row than at every other row count (2-600 agree), so a request alone decoded
# from other logits than the same request batched; and one or two rows stream the weights
# slower than three (2-core Zen 4, 121 linears of SmolLM2 at 2 threads, min of 15: 25.2 / 28.5
# / 22.7 ms for 1 / 2 / 3 rows). With AVX2 kernels one row is the fastest (27.8 vs 29.3 ms for
# three) and every row count already agrees, so nothing is padded.
MIN_ROWS_AVX512 = 3


def onednn_isa_is_avx512() -> bool:
    """Whether oneDNN JITs AVX-512 kernels here: ATen's capability (ATEN_CPU_CAPABILITY caps it)
    and oneDNN's own cap (ONEDNN_MAX_CPU_ISA, e.g. AVX2 or AVX512_CORE_VNNI) both allow it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    onednn_allows = cap in ("ALL", "DEFAULT") or cap.startswith("AVX512") or cap.startswith(
        "AVX10")
    return onednn_allows and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_rows(num_rows: int, min_rows: int = 1) -> int:
    """The row count a product of `num_rows` rows is computed with (see ROW_BUCKET, MIN_ROWS)."""
    if num_rows <= EXACT_ROWS:
        return max(num_rows, min_rows)
    return -(-num_rows // ROW_BUCKET) * ROW_BUCKET


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise")


KERNELS = ("fgemm", "onednn")


def resolve_kernel(choice: str) -> str | None:
    """The kernel `--dense-kernel choice` runs fp32 CPU linears on, or None (torch's own):
    auto takes fgemm where its vector (avx2 / avx512) build runs, else oneDNN where torch has it
    (fgemm's portable build is plain scalar C++). A kernel asked for by name and not available
    is an error."""
    if choice == "torch":
        return None
    native = build.native()
    if native is not None and (choice == "fgemm" or
                               (choice == "auto" and native.flavour() != "generic")):
        return "fgemm"
    if choice in ("auto", "onednn") and onednn_available():
        return "onednn"
    if choice == "auto":
        return None
    raise RuntimeError(f"--dense-kernel {choice}: not available on this machine")


class PackedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, kernel: str = "onednn"):
        super().__init__(in_features, out_features, bias=False, device="meta")
        if kernel not in KERNELS:
            raise ValueError(f"dense kernel must be one of {KERNELS}")
        self.kernel = kernel
        self._packed: torch.Tensor | FGemmWeight | None = None
        self._packed_of: tuple[int, torch.dtype, torch.device, int] | None = None
        self.min_rows = MIN_ROWS_AVX512 if onednn_isa_is_avx512() else 1

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "onednn") -> PackedLinear:
        assert linear.bias is None, "the model contract has bias-free linears"
        packed = cls(linear.in_features, linear.out_features, kernel)
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

    def native_operands(self, device: torch.device) -> tuple[str, FGemmWeight, str] | None:
        """("fgemm", its packed weight, the flavour it runs on) when this linear's products run
        on fgemm on `device`, else None: what a fused layer needs to call the kernel itself."""
        w = self.weight
        if (self.kernel != "fgemm" or device.type != "cpu" or w.device.type != "cpu"
                or w.dtype != torch.float32):
            return None
        module = build.native()
        if module is None:
            return None
        return "fgemm", self._fgemm_weight(), module.flavour()

    def kernel_tensors(self) -> list[torch.Tensor]:
        """The weight form a forward streams, built now: fgemm's blocks (oneDNN's reordered
        copy is built at the first call and not listed; the weight itself stays put, since its
        address is the packed copy's key)."""
        if self.kernel != "fgemm" or self.native_operands(self.weight.device) is None:
            return []
        return [self._fgemm_weight().w]

    def _fgemm_weight(self) -> FGemmWeight:
        if not isinstance(self._packed, FGemmWeight) or self._packed_of != self._key():
            self._packed, self._packed_of = pack(self.weight), self._key()
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(x):
            return nn.functional.linear(x, self.weight)
        flat = x.reshape(-1, self.in_features).contiguous()  # (T, in)
        if self.kernel == "fgemm":
            out = build.native().fgemm(flat, self._fgemm_weight().w, self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
        if self._packed is None or self._packed_of != self._key():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                                   PACK_ROWS)
            self._packed_of = self._key()
        num_rows = flat.shape[0]
        padded = onednn_rows(num_rows, self.min_rows)
        if padded != num_rows:
            flat = torch.cat([flat, flat.new_zeros(padded - num_rows, self.in_features)])
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, None, "none", [], "")
        return out[:num_rows].view(*x.shape[:-1], self.out_features)


def pack_dense_linears(model: nn.Module, choice: str = "auto") -> int:
    """Put every fp32 CPU linear of `model` on the kernel `choice` resolves to, in place, and
    return how many are packed: a plain `nn.Linear` becomes a `PackedLinear`, one an earlier
    engine packed for another kernel is packed again, and with torch's own product (`torch`, or
    `auto` where neither kernel runs) it is a plain `nn.Linear` again; the weight tensors are
    shared throughout (a tied embedding stays tied). Quantized modules are not `nn.Linear` and
    are left alone."""
    kernel = resolve_kernel(choice)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.Linear, PackedLinear) and m.bias is None
               and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    for name, linear in targets:
        if getattr(linear, "kernel", None) == kernel:
            continue
        model.set_submodule(name, _plain_linear(linear) if kernel is None
                            else PackedLinear.from_linear(linear, kernel))
    if targets and kernel is not None:
        log.info("dense kernel: %s for %d fp32 linears", kernel if kernel == "onednn" else
                 f"fgemm ({build.native().flavour()})", len(targets))
    return len(targets) if kernel is not None else 0


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    plain = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    plain.weight = linear.weight
    return plain
