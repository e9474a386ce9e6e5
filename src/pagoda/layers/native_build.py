"""Building pagoda's C++ CPU kernels (`*/csrc/*.cpp`) with torch's extension builder.

Each kernel is compiled once into ~/.cache/torch_extensions (20-60 s with a compiler and ninja
present; `make` prebuilds them) and later loads take milliseconds. Builds use -march=native, so
the cached binary is keyed by this CPU's feature flags. When a kernel cannot be built (no
compiler, not a CPU build) `load_native` returns None once, logged, and callers fall back to
their torch path.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.blake2b(f"{platform.machine()}|{flags}".encode(), digest_size=4).hexdigest()


@cache
def load_native(stem: str, source: Path | tuple[Path, ...], what: str) -> Any | None:
    """The compiled module `pagoda_<stem>` built from `source`(s), or None if it cannot be built.

    `what` names the kernel in log lines ("the C++ paged-attention kernel").
    """
    sources = [str(p) for p in (source if isinstance(source, tuple) else (source,))]
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    log.info("loading %s (the first build takes up to a minute)", what)
    try:
        module = load(name=f"pagoda_{stem}_{_cpu_key()}", sources=sources,
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                      verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("%s unavailable (%s: %s); using the torch path", what, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return None
    log.info("%s ready in %.1f s", what, time.perf_counter() - start)
    return module


def build_all() -> int:
    """Build every C++ kernel now (`make` calls this); returns how many could not be built."""
    from pagoda.layers import paged_decode_cpp
    from pagoda.quant import int8_ops

    return sum(module is None for module in (paged_decode_cpp.extension(), int8_ops.extension()))


if __name__ == "__main__":  # `python -m pagoda.layers.native_build`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(build_all())
