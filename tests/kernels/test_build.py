"""The flavour table: which ISA flavours exist, which this CPU runs, and that each one built is
really compiled for its ISA (not silently for the machine's native one)."""

from __future__ import annotations

import pytest

from pagoda.kernels import build


def test_generic_always_runs_and_best_is_last():
    runnable = build.runnable_flavours()
    assert runnable[0] == "generic"
    assert build.best_flavour() == runnable[-1]


def test_flavour_needs_follow_cpuinfo():
    if not build.is_x86():
        pytest.skip("the avx2/avx512 flavours are x86 only")
    flags = build.cpu_flags()
    if build.isa_cap():
        pytest.skip(f"PAGODA_KERNEL_ISA={build.isa_cap()} caps the flavours")
    assert build.can_run("avx2") == ({"avx2", "fma", "f16c"} <= flags)
    assert build.can_run("avx512") == ({"avx512_vnni", "avx512bw", "avx512vl", "avx2"} <= flags)
    assert build.missing_flags("generic") == []


def test_each_built_module_reports_its_own_flavour(flavour: str):
    assert build.load(flavour).flavour() == flavour
