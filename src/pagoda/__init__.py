"""Pagoda: an LLM serving stack. Offline entry points: `LLM`, `SamplingParams`."""

import os

# numpy's OpenBLAS thread pool can contend with torch's OpenMP team for the cores: on a loaded
# 2-core machine, engine steps in the thread that loaded the GGUF (numpy dequantization) were
# measured up to 15x slower, and not with one OpenBLAS thread. The engine does no BLAS through
# numpy, so one OpenBLAS thread costs nothing. Must precede numpy's import; users' settings win.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagoda.sampling.params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked for.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
