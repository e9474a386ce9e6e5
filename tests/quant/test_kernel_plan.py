"""The kernel table (`quant/kernel_plan.py`), enumerated: every format x row bucket x CPU."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import build
from pagoda.quant.kernel_plan import WeightFormat, choose, describe

CPU = torch.device("cpu")
FORMATS = {
    "int8 per channel": WeightFormat("int8", 8, 576, 576),
    "gguf Q4_1/Q4_K": WeightFormat("gguf", 4, 32, 576),
    "gguf Q8_0": WeightFormat("gguf", 8, 32, 1536),
    "gguf Q6_K": WeightFormat("gguf", 8, 16, 576),
    "int4 g64": WeightFormat("int4", 4, 64, 1536),
}


# what auto picks: the integer GEMM for 4/8-bit groups of 32k, fp32-widened weights for the rest
AUTO = {"int8 per channel": "igemm", "gguf Q4_1/Q4_K": "igemm", "gguf Q8_0": "igemm",
        "gguf Q6_K": "wgemm", "int4 g64": "igemm"}


@pytest.mark.parametrize("name", list(FORMATS))
def test_auto_takes_the_best_flavour_of_its_kernel_for_every_supported_format(name: str):
    choice = choose(FORMATS[name], CPU, "auto")
    assert (choice.kernel, choice.flavour) == (AUTO[name], build.best_flavour())
    for other in ("qgemm", "wgemm"):  # each stays one flag away
        asked = choose(FORMATS[name], CPU, other)
        assert (asked.kernel, asked.flavour) == (other, build.best_flavour())


def test_shapes_qgemm_refuses_run_on_wgemm_and_odd_groups_fall_back():
    odd = WeightFormat("int8", 8, 100, 100)  # K not a multiple of 32: wgemm takes any K
    assert choose(odd, CPU, "auto").kernel == "wgemm"
    with pytest.raises(ValueError, match="K=100"):
        choose(odd, CPU, "qgemm")
    assert choose(WeightFormat("int4", 4, 16, 512), CPU, "auto").kernel == "wgemm"
    with pytest.raises(ValueError, match="groups of 16"):  # igemm: groups of 32k only
        choose(WeightFormat("int4", 4, 16, 512), CPU, "igemm")
    with pytest.raises(ValueError, match="groups of 16"):
        choose(FORMATS["gguf Q6_K"], CPU, "igemm")
    # 4-bit groups of an odd size split a byte's two values between groups: neither kernel
    odd_group = WeightFormat("int4", 4, 33, 99)
    assert choose(odd_group, CPU, "auto").kernel in ("fbgemm", "reference")
    with pytest.raises(ValueError, match="groups of 33"):
        choose(odd_group, CPU, "wgemm")


@pytest.mark.parametrize("kernel", ["qgemm", "wgemm", "igemm"])
@pytest.mark.parametrize("flavour", list(build.FLAVOURS))
def test_forcing_a_flavour(kernel: str, flavour: str):
    fmt = FORMATS["gguf Q4_1/Q4_K"]
    if build.can_run(flavour):
        choice = choose(fmt, CPU, f"{kernel}-{flavour}")
        assert (choice.kernel, choice.flavour) == (kernel, flavour)
    else:
        with pytest.raises(ValueError, match="lacks"):
            choose(fmt, CPU, f"{kernel}-{flavour}")


def test_other_devices_and_reference_take_the_portable_path():
    fmt = FORMATS["int8 per channel"]
    assert choose(fmt, torch.device("meta"), "auto").kernel == "reference"
    assert choose(fmt, CPU, "reference").kernel == "reference"
    assert choose(fmt, CPU, "fbgemm").kernel in ("fbgemm", "reference")


def test_the_plan_is_described_one_line_per_format():
    choices = {f"m{i}": (fmt, choose(fmt, CPU, "auto")) for i, fmt in enumerate(FORMATS.values())}
    choices["extra"] = (FORMATS["int8 per channel"], choose(FORMATS["int8 per channel"], CPU,
                                                            "auto"))
    lines = describe(choices)
    assert len(lines) == len(FORMATS)
    assert any(line.strip().startswith("2 x int8 8-bit g576") for line in lines)
    for name, fmt in FORMATS.items():
        what = f"{fmt.method} {fmt.bits}-bit g{fmt.group} K={fmt.in_features}"
        line = next(line for line in lines if what in line)
        assert f"{AUTO[name]}-{build.best_flavour()}" in line
