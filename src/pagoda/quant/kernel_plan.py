"""The kernel table: which kernel multiplies a quantized weight, resolved once per module.

    weight format x row bucket x CPU capability -> kernel

| format (bits, group)            | rows | CPU                         | auto picks             |
|---------------------------------|------|-----------------------------|------------------------|
| int8 per channel, int4, GGUF    | any  | x86 with AVX512-VNNI/BW/VL  | qgemm, avx512 flavour  |
| (K % 32 == 0; 4-bit g % 32 == 0;| any  | x86 with AVX2 + FMA         | qgemm, avx2 flavour    |
|  8-bit g == 16 or g % 32 == 0)  | any  | any other CPU               | qgemm, generic flavour |
| any other shape                 | any  | x86 with fbgemm             | fbgemm (re-rounded)    |
| any                             | any  | no kernel built, or not CPU | reference              |

Every row bucket of a format takes the same kernel under "auto": decode rows (1-4) and prefill
rows compute the same arithmetic on the same numbers, so a request's greedy tokens do not depend
on its batch (qgemm's invariant, `kernels/csrc/qgemm.cpp`). Forcing "onednn" or "fbgemm" trades
that for those libraries' prefill speed: their per-row activation scales and outlier-column
split depend on the rest of the batch. fp16/bf16 weights (`HalfLinear`) keep their own path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from pagoda.kernels import build
from pagoda.kernels.qgemm import shape_supported
from pagoda.quant.kernels import int8_kernel


@dataclass(frozen=True)
class WeightFormat:
    """What the table needs to know of a quantized weight."""

    method: str  # "int8" | "int4" | "gguf"
    bits: int  # 4 or 8
    group: int  # weights per scale along K (K itself for per-channel int8)
    in_features: int


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "qgemm" | "onednn" | "fbgemm" | "reference"
    flavour: str = ""  # qgemm's ISA flavour
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.kernel}-{self.flavour}" if self.flavour else self.kernel


def choose(fmt: WeightFormat, device: torch.device, requested: str) -> KernelChoice:
    """The kernel for `fmt` on `device` under `--quant-kernel requested`."""
    if device.type != "cpu" or requested == "reference":
        return KernelChoice("reference", reason="not a CPU" if device.type != "cpu" else "asked")
    fits = shape_supported(fmt.in_features, fmt.group, fmt.bits)
    if requested.startswith("qgemm-"):
        flavour = requested.removeprefix("qgemm-")
        if not build.can_run(flavour):
            raise ValueError(f"--quant-kernel {requested}: this CPU lacks "
                             f"{', '.join(build.missing_flags(flavour))}")
        if not fits:
            raise ValueError(f"--quant-kernel {requested}: qgemm does not take K="
                             f"{fmt.in_features} with {fmt.bits}-bit groups of {fmt.group}")
        if build.load(flavour) is None:
            raise RuntimeError(f"the {flavour} C++ kernels could not be built here")
        return KernelChoice("qgemm", flavour, "asked")
    module = build.native() if requested in ("auto", "qgemm") and fits else None
    if module is not None:
        return KernelChoice("qgemm", module.flavour(), "best flavour this CPU runs")
    if requested == "qgemm":
        raise ValueError(f"--quant-kernel qgemm: no qgemm for K={fmt.in_features} with "
                         f"{fmt.bits}-bit groups of {fmt.group}, or no C++ compiler here")
    kernel = int8_kernel(device, "fbgemm" if requested == "auto" else requested)
    why = "asked" if requested != "auto" else "qgemm does not take this shape"
    return KernelChoice(kernel, reason=why)


def describe(choices: dict[str, tuple[WeightFormat | None, KernelChoice]]) -> list[str]:
    """One line per (format, kernel) pair with its module count, for the start-up log."""
    counts: Counter[tuple[str, str]] = Counter()
    for fmt, choice in choices.values():
        what = ("half precision" if fmt is None
                else f"{fmt.method} {fmt.bits}-bit g{fmt.group} K={fmt.in_features}")
        counts[(what, f"{choice.label} ({choice.reason})" if choice.reason else choice.label)] += 1
    return [f"{n:3d} x {what:<28} -> {kernel}" for (what, kernel), n in sorted(counts.items())]
