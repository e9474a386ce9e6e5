"""Embedding test helpers (the model fixtures, shared with tests/server: tests/conftest.py)."""

from __future__ import annotations

MINILM = "all-MiniLM-L6-v2"


def run_engine(engine, sequences: list[list[int]]) -> list[list[float]]:
    """Add every sequence as a request, step until all are done; vectors in input order."""
    for i, ids in enumerate(sequences):
        engine.add_tokenized_request(f"e{i}", None, ids, None)
    vectors: dict[str, list[float]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.finished and out.error is None and out.embedding is not None
            vectors[out.req_id] = out.embedding
    return [vectors[f"e{i}"] for i in range(len(sequences))]
