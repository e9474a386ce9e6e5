"""Pagoda: an LLM serving stack. Offline entry points: `LLM`, `SamplingParams`."""

import os

# numpy's OpenBLAS thread pool can contend with torch's OpenMP team for the cores: on a loaded
# 2-core machine, engine steps in the thread that loaded the GGUF (numpy dequantization) were
# measured up to 15x slower, and not with one OpenBLAS thread. The engine does no BLAS through
# numpy, so one OpenBLAS thread costs nothing. Must precede numpy's import; users' settings win.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's OpenMP workers spin ~300k iterations at each barrier before sleeping. With every core in
# use and one more busy process (a client, a gateway), a spinning worker holds the core its
# descheduled partner needs: batch-1 decode fell from 32 to 3-6 tok/s next to one busy process.
# 30k spins kept idle speed (32 tok/s) and gave 8 tok/s there; passive waiting gave 18 but cost a
# third of idle speed. Must precede torch's import; users' settings win.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from pagoda.sampling.params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]
__version__ = "0.1.0"  # keep in step with pyproject.toml


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked for.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
