"""The kernel table: which kernel multiplies a quantized weight, resolved once per module.

    weight format x row bucket x CPU capability -> kernel

| format (bits, group)               | rows | CPU                         | auto picks             |
|------------------------------------|------|-----------------------------|------------------------|
| int8 per channel, int4, GGUF       | any  | x86 with AVX512-F/BW/VL/DQ  | wgemm, avx512 flavour  |
| (4-bit: even groups dividing K;    | any  | x86 with AVX2 + FMA         | wgemm, avx2 flavour    |
|  8-bit: groups dividing K)         | any  | any other CPU               | wgemm, generic flavour |
| 4-bit groups of odd size           | any  | x86 with fbgemm             | fbgemm (re-rounded)    |
| any                                | any  | no kernel built, or not CPU | reference              |

Every row bucket of a format takes the same kernel under "auto": decode rows (1-4) and prefill
rows compute the same arithmetic on the same numbers, so a request's greedy tokens do not depend
on its batch (`kernels/csrc/wgemm.cpp`: one fma chain per output; the flavours even agree bit
for bit). Why wgemm and not qgemm (`--quant-kernel qgemm`, activations rounded to int8 per
32-block): measured on an AMX Xeon (docs/benchmarks.md), the GGUF model's 32-request throughput
is 1.27x qgemm's with the avx512 flavours and 1.35x with the avx2 ones, batch-1 decode 1.06x and
1.12x, and its activations are not rounded at all. Forcing "onednn" or "fbgemm" trades batch
invariance for those libraries' int8 GEMMs: their per-row activation scales and outlier-column
split depend on the rest of the batch. fp16/bf16 weights (`HalfLinear`) keep their own path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from pagoda.kernels import build
from pagoda.kernels.qgemm import shape_supported as qgemm_shape_supported
from pagoda.kernels.wgemm import shape_supported as wgemm_shape_supported
from pagoda.quant.kernels import int8_kernel

NATIVE_KERNELS = ("qgemm", "wgemm")  # Pagoda's own, each in every ISA flavour (kernels/build.py)
AUTO_KERNEL = "wgemm"  # what "auto" picks when the shape fits (module docstring: why)


@dataclass(frozen=True)
class WeightFormat:
    """What the table needs to know of a quantized weight."""

    method: str  # "int8" | "int4" | "gguf"
    bits: int  # 4 or 8
    group: int  # weights per scale along K (K itself for per-channel int8)
    in_features: int


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "qgemm" | "wgemm" | "onednn" | "fbgemm" | "reference"
    flavour: str = ""  # the ISA flavour of qgemm / wgemm
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.kernel}-{self.flavour}" if self.flavour else self.kernel


def fits(kernel: str, fmt: WeightFormat) -> bool:
    """Whether Pagoda's own `kernel` ("qgemm" | "wgemm") takes this format's shape."""
    check = qgemm_shape_supported if kernel == "qgemm" else wgemm_shape_supported
    return check(fmt.in_features, fmt.group, fmt.bits)


def choose(fmt: WeightFormat, device: torch.device, requested: str) -> KernelChoice:
    """The kernel for `fmt` on `device` under `--quant-kernel requested`."""
    if device.type != "cpu" or requested == "reference":
        return KernelChoice("reference", reason="not a CPU" if device.type != "cpu" else "asked")
    kernel, _, flavour = (AUTO_KERNEL if requested == "auto" else requested).partition("-")
    if kernel in NATIVE_KERNELS:
        shape_ok = fits(kernel, fmt)
        if flavour:
            if not build.can_run(flavour):
                raise ValueError(f"--quant-kernel {requested}: this CPU lacks "
                                 f"{', '.join(build.missing_flags(flavour))}")
            if not shape_ok:
                raise ValueError(f"--quant-kernel {requested}: {kernel} does not take K="
                                 f"{fmt.in_features} with {fmt.bits}-bit groups of {fmt.group}")
            if build.load(flavour) is None:
                raise RuntimeError(f"the {flavour} C++ kernels could not be built here")
            return KernelChoice(kernel, flavour, "asked")
        module = build.native() if shape_ok else None
        if module is not None:
            return KernelChoice(kernel, module.flavour(), "best flavour this CPU runs")
        if requested != "auto":
            raise ValueError(f"--quant-kernel {requested}: no {kernel} for K={fmt.in_features} "
                             f"with {fmt.bits}-bit groups of {fmt.group}, or no C++ compiler "
                             "here")
    choice = int8_kernel(device, "fbgemm" if requested == "auto" else requested)
    why = "asked" if requested != "auto" else f"{AUTO_KERNEL} does not take this shape"
    return KernelChoice(choice, reason=why)


def describe(choices: dict[str, tuple[WeightFormat | None, KernelChoice]]) -> list[str]:
    """One line per (format, kernel) pair with its module count, for the start-up log."""
    counts: Counter[tuple[str, str]] = Counter()
    for fmt, choice in choices.values():
        what = ("half precision" if fmt is None
                else f"{fmt.method} {fmt.bits}-bit g{fmt.group} K={fmt.in_features}")
        counts[(what, f"{choice.label} ({choice.reason})" if choice.reason else choice.label)] += 1
    return [f"{n:3d} x {what:<28} -> {kernel}" for (what, kernel), n in sorted(counts.items())]
