"""The kernel table: which kernel multiplies a quantized weight, resolved once per module.

    weight format x row bucket x CPU capability -> kernel

| format (bits, group)               | rows | CPU                         | auto picks             |
|------------------------------------|------|-----------------------------|------------------------|
| 4- or 8-bit, groups multiples of   | any  | x86 with AVX512-F/BW/VL/DQ  | igemm, avx512 flavour  |
| 32 (GGUF Q4_0/Q4_1/Q4_K/Q8_0,      |      |   and AVX512-VNNI           |                        |
| int4, int8 per channel)            | any  | x86 with AVX2 + FMA         | igemm, avx2 flavour    |
|                                    | any  | any other CPU               | igemm, generic flavour |
| other groups: even ones dividing K | any  | as above                    | wgemm, same flavours   |
| (4-bit), Q6_K's 16 (8-bit)         |      |                             |                        |
| 4-bit groups of odd size           | any  | x86 with fbgemm             | fbgemm (re-rounded)    |
| any                                | any  | no kernel built, or not CPU | reference              |

Every row bucket of a format takes the same kernel under "auto": decode rows (1-4) and prefill
rows compute the same arithmetic on the same numbers, so a request's greedy tokens do not depend
on its batch (`kernels/csrc/igemm.cpp`, `wgemm.cpp`: one fixed fp32 chain per output; the
flavours even agree bit for bit). igemm rounds each row's activations to int8 per 32-block, as
llama.cpp does for these formats, and multiplies integers: 4-bit measured 1.1-2.1x wgemm's speed
with the avx2 flavours and 1.4-2.9x with the avx512 ones; 8-bit (int16 pairs: `vpmaddwd`,
`vpdpwssd`) 1.05-3.0x and 1.1-1.6x at decode rows, 0.84-1.25x at 256. Perplexity: 1.1% above
the fp32 product's for the GGUF's blocks, 0.4% for int8 (docs/quantization.md). wgemm
(`--quant-kernel wgemm`) widens the weights to fp32 and never rounds the activations (the GGUF's
fp32 model's product, transformers' tokens); it takes the groups igemm cannot. qgemm is the
int8-activation GEMV igemm replaced (kept as a reference). Forcing "onednn" or "fbgemm" trades
batch invariance for those libraries' int8 GEMMs: their per-row activation scales and
outlier-column split depend on the rest of the batch. fp16/bf16 weights (`HalfLinear`) keep
their own path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from pagoda.kernels import build
from pagoda.kernels.igemm import shape_supported as igemm_shape_supported
from pagoda.kernels.qgemm import shape_supported as qgemm_shape_supported
from pagoda.kernels.wgemm import shape_supported as wgemm_shape_supported
from pagoda.quant.kernels import int8_kernel

# Pagoda's own, each in every ISA flavour (kernels/build.py)
NATIVE_KERNELS = ("qgemm", "wgemm", "igemm")
AUTO_KERNELS = ("igemm", "wgemm")  # what "auto" tries, in order (module docstring: why)


@dataclass(frozen=True)
class WeightFormat:
    """What the table needs to know of a quantized weight."""

    method: str  # "int8" | "int4" | "gguf"
    bits: int  # 4 or 8
    group: int  # weights per scale along K (K itself for per-channel int8)
    in_features: int


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "igemm" | "wgemm" | "qgemm" | "onednn" | "fbgemm" | "reference"
    flavour: str = ""  # the ISA flavour of igemm / wgemm / qgemm
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.kernel}-{self.flavour}" if self.flavour else self.kernel


_AUTO_HINT = " (auto picks igemm for 4/8-bit groups of 32k and wgemm for the rest)"


def fits(kernel: str, fmt: WeightFormat) -> bool:
    """Whether Pagoda's own `kernel` ("igemm" | "wgemm" | "qgemm") takes this format's shape."""
    check = {"igemm": igemm_shape_supported, "wgemm": wgemm_shape_supported,
             "qgemm": qgemm_shape_supported}[kernel]
    return check(fmt.in_features, fmt.group, fmt.bits)


def auto_kernel(fmt: WeightFormat) -> str:
    """The first of AUTO_KERNELS that takes `fmt` (the last one when none does)."""
    return next((k for k in AUTO_KERNELS if fits(k, fmt)), AUTO_KERNELS[-1])


def choose(fmt: WeightFormat, device: torch.device, requested: str) -> KernelChoice:
    """The kernel for `fmt` on `device` under `--quant-kernel requested`."""
    if device.type != "cpu" or requested == "reference":
        return KernelChoice("reference", reason="not a CPU" if device.type != "cpu" else "asked")
    kernel, _, flavour = (auto_kernel(fmt) if requested == "auto" else requested).partition("-")
    if kernel in NATIVE_KERNELS:
        shape_ok = fits(kernel, fmt)
        if flavour:
            if not build.can_run(flavour):
                raise ValueError(f"--quant-kernel {requested}: this CPU lacks "
                                 f"{', '.join(build.missing_flags(flavour))}")
            if not shape_ok:
                raise ValueError(f"--quant-kernel {requested}: {kernel} does not take K="
                                 f"{fmt.in_features} with {fmt.bits}-bit groups of {fmt.group}"
                                 f"{_AUTO_HINT}")
            if build.load(flavour) is None:
                raise RuntimeError(f"the {flavour} C++ kernels could not be built here")
            return KernelChoice(kernel, flavour, "asked")
        module = build.native() if shape_ok else None
        if module is not None:
            return KernelChoice(kernel, module.flavour(), "best flavour this CPU runs")
        if requested != "auto":
            raise ValueError(f"--quant-kernel {requested}: no {kernel} for K={fmt.in_features} "
                             f"with {fmt.bits}-bit groups of {fmt.group}, or no C++ compiler "
                             f"here{_AUTO_HINT}")
    choice = int8_kernel(device, "fbgemm" if requested == "auto" else requested)
    why = "asked" if requested != "auto" else f"{kernel} does not take this shape"
    return KernelChoice(choice, reason=why)


def describe(choices: dict[str, tuple[WeightFormat | None, KernelChoice]]) -> list[str]:
    """One line per (format, kernel) pair with its module count, for the start-up log."""
    counts: Counter[tuple[str, str]] = Counter()
    for fmt, choice in choices.values():
        what = ("half precision" if fmt is None
                else f"{fmt.method} {fmt.bits}-bit g{fmt.group} K={fmt.in_features}")
        counts[(what, f"{choice.label} ({choice.reason})" if choice.reason else choice.label)] += 1
    return [f"{n:3d} x {what:<28} -> {kernel}" for (what, kernel), n in sorted(counts.items())]
