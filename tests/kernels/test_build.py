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


def test_a_build_lock_left_by_a_killed_build_is_cleared(tmp_path):
    """torch's `lock` file outlives a build that was killed (the CI hang of stop 23): under our
    flock it can only be stale, so it is removed rather than waited on for ever."""
    (tmp_path / "lock").touch()
    with build.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_the_build_lock_is_released_when_its_holder_is_killed(tmp_path):
    """A process holding the lock is SIGKILLed mid-'build' (torch's lock file created and never
    released); the next build gets the lock at once and clears the stale file."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time\n"
        "from pagoda.kernels.build import build_lock\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "with build_lock(d):\n"
        "    (d / 'lock').touch(); print('held', flush=True); time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (tmp_path / "lock").exists()
    # In a child with a time limit, so a lock that is not released fails the test, not hangs it.
    taker = subprocess.run([sys.executable, "-c", (
        "import pathlib\n"
        "from pagoda.kernels.build import build_lock\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "with build_lock(d):\n"
        "    print((d / 'lock').exists())\n")], capture_output=True, text=True, timeout=60)
    assert taker.returncode == 0, taker.stderr
    assert taker.stdout.strip() == "False"


def test_build_directories_are_per_flavour_and_torch_version():
    import torch

    dirs = {build.build_directory(f) for f in build.FLAVOURS}
    assert len(dirs) == len(build.FLAVOURS)
    assert all(f"torch{torch.__version__}-" in d.parent.name for d in dirs)
