"""Building pagoda's C++ kernels: every source in `csrc/`, one Python module per ISA flavour.

A flavour is a fixed set of compiler flags, never `-march=native`: a native build only contains
(and so only tests) the code path of the machine it was built on. Each flavour's module is named
`pagoda_kernels_<flavour>` and compiled once per source version into ~/.cache/torch_extensions by
torch's extension builder (ninja, both cores); `make` prebuilds the flavours this CPU can run.

torch guards a build directory with a `lock` file that only its own `release()` removes: a build
killed mid-way (Ctrl-C, a timeout, a machine stopped) leaves it behind and every later build of
that flavour waits on it forever. So each build runs under an `flock` of our own (released by the
kernel when its holder dies, however it dies), and a torch lock found while holding it can only
be stale and is removed.

- generic: portable C++ (any CPU; the compiler's baseline ISA).
- avx2: AVX2 + FMA + F16C (x86 since 2013/2015: Haswell, Zen).
- avx512: AVX-512 F/BW/VL/DQ + VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4).

`runnable_flavours()` lists those this CPU can execute, best last; `best_flavour()` is what the
engine uses. A flavour that cannot be built (no compiler, not a CPU build) yields None, logged
once, and callers fall back to their torch path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("bindings.cpp", "qgemm.cpp", "wgemm.cpp", "wgemm_direct.cpp", "fgemm.cpp",
           "igemm.cpp", "igemm8.cpp", "paged_decode.cpp", "quantize_rows.cpp", "fused_ops.cpp",
           "decode_layer.cpp")

FLAVOURS: dict[str, tuple[str, ...]] = {
    "generic": (),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx512vnni"),
}
# The /proc/cpuinfo flags a flavour needs (x86 only; "generic" needs none).
_NEEDS: dict[str, tuple[str, ...]] = {
    "generic": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
               "avx512_vnni"),
}


@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def isa_cap() -> str | None:
    """`PAGODA_KERNEL_ISA=avx2` (or generic) makes this machine run as if it had no better ISA:
    the way to exercise an AVX2 CPU's code paths on an AVX-512 one (with fbgemm's own
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2). Read at each call; an unknown name is an error."""
    cap = os.environ.get("PAGODA_KERNEL_ISA") or None
    if cap is not None and cap not in FLAVOURS:
        raise ValueError(f"PAGODA_KERNEL_ISA={cap!r} is not one of {list(FLAVOURS)}")
    return cap


def can_run(flavour: str) -> bool:
    cap = isa_cap()
    if cap is not None and list(FLAVOURS).index(flavour) > list(FLAVOURS).index(cap):
        return False
    if flavour == "generic":
        return True
    return is_x86() and set(_NEEDS[flavour]) <= cpu_flags()


def runnable_flavours() -> list[str]:
    """The flavours this CPU executes, in the order of FLAVOURS (best last)."""
    return [f for f in FLAVOURS if can_run(f)]


def missing_flags(flavour: str) -> list[str]:
    """Why `flavour` cannot run here (for skip messages)."""
    if flavour != "generic" and not is_x86():
        return [f"an x86 CPU (this is {platform.machine()})"]
    missing = sorted(set(_NEEDS[flavour]) - cpu_flags())
    if not missing and not can_run(flavour):
        return [f"permission: PAGODA_KERNEL_ISA={isa_cap()}"]
    return missing


def build_directory(flavour: str) -> Path:
    """Where `flavour` is compiled: torch's build root (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions), one folder per Python and torch version and per source folder
    (two checkouts side by side would otherwise rebuild over each other: ninja's commands name
    the sources' paths)."""
    import hashlib

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    where = hashlib.sha256(str(CSRC.resolve()).encode()).hexdigest()[:8]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{where}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / tag / f"pagoda_kernels_{flavour}"


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `directory`'s build; clear a stale torch lock inside it.

    Every pagoda build of this directory takes this lock first, so a torch `lock` file seen while
    holding it belongs to no running build."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock; torch's own baton alone
        yield
        return
    with open(directory / "pagoda.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@cache
def load(flavour: str) -> ModuleType | None:
    """The compiled module of `flavour`, or None if it cannot be built or run here."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown kernel flavour {flavour!r}; choose from {list(FLAVOURS)}")
    if not can_run(flavour):
        return None
    from torch.utils.cpp_extension import load as build

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    start = time.perf_counter()
    log.info("loading the %s C++ kernels (the first build takes a minute or two)", flavour)
    flags = ["-O3", "-fopenmp", "-fno-math-errno", *FLAVOURS[flavour]]
    directory = build_directory(flavour)
    try:
        with build_lock(directory):
            module = build(name=f"pagoda_kernels_{flavour}",
                           sources=[str(CSRC / s) for s in SOURCES],
                           extra_cflags=flags, build_directory=str(directory), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("%s kernels unavailable (%s: %s); using torch ops", flavour,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    log.info("%s kernels ready in %.1f s", flavour, time.perf_counter() - start)
    return module


def best_flavour() -> str:
    """The fastest flavour this CPU runs (what `auto` kernels use)."""
    return runnable_flavours()[-1]


@cache
def native() -> ModuleType | None:
    """The module of the best flavour that builds here, or None; resolved once per process, as
    the hot paths (every decode attention call) ask for it."""
    for flavour in reversed(runnable_flavours()):
        module = load(flavour)
        if module is not None:
            return module
    return None


def module_for(device_type: str, flavour: str | None) -> ModuleType | None:
    """The module a product on `device_type` calls: `flavour`'s build, or the best this CPU
    runs; None off the CPU or without a built kernel (the caller's torch reference then runs).
    A flavour asked for by name that is not available is an error, never a silent fallback."""
    if device_type != "cpu":
        module = None
    else:
        module = load(flavour) if flavour else native()
    if module is None and flavour:
        raise RuntimeError(f"the {flavour} kernels are not available on this machine")
    return module


# One flavour compiles in 1-2 minutes on 2 cores; ten times that means something is stuck, and
# `make` must fail over to the torch path rather than wait for ever.
BUILD_TIMEOUT_S = 1200


def build_all() -> int:
    """Build every flavour this CPU runs (`make` calls this); returns how many failed.

    Each flavour compiles in its own process, all at once, so both cores stay busy (2-core Zen
    4, all three flavours when the bindings still parsed all of torch's C++ headers: 113 s one
    after another, 86 s side by side). Then each is loaded here, from the cache, to report
    failures."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def build_one(flavour: str) -> bool:
        code = f"import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); " \
               f"from pagoda.kernels.build import load; load({flavour!r})"
        try:
            subprocess.run([sys.executable, "-c", code], check=False, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the %s kernels' build took over %d s; stopped", flavour, BUILD_TIMEOUT_S)
            return False
        return True

    flavours = runnable_flavours()
    with ThreadPoolExecutor(len(flavours)) as pool:
        finished = list(pool.map(build_one, flavours))
    # A build that timed out is not retried here: it would block `make` without a time limit.
    return sum(not done or load(f) is None for f, done in zip(flavours, finished, strict=True))


if __name__ == "__main__":  # `python -m pagoda.kernels.build`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(build_all())
