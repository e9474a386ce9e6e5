"""Pagoda: an LLM serving stack. Offline entry points: `LLM`, `SamplingParams`."""

from pagoda.sampling.params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked for.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
