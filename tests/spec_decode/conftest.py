"""Shared by the speculative decoding tests: the low-bit self-draft, loaded once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gguf_draft(loaded_model):
    """The default model again, on its GGUF blocks (qgemm): the practical CPU draft."""
    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization

    draft = load_model(loaded_model.path, progress=False)
    apply_quantization(draft, "gguf")
    return draft


@pytest.fixture(scope="session")
def int4_draft(loaded_model):
    """A weaker draft (int4 groups of the fp32 weights): its guesses are rejected more often."""
    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization

    draft = load_model(loaded_model.path, progress=False)
    apply_quantization(draft, "int4")
    return draft
