"""`--task embed` on a decoder: the last token's final hidden state, L2-normalized, equals
transformers' on the same weights (the pooling vLLM uses for causal models)."""

from __future__ import annotations

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.embedding_engine import EmbeddingEngine
from tests.embeddings.conftest import run_engine
from tests.embeddings.texts import TEXTS


def test_last_token_pooling_matches_transformers(loaded_model, hf_computed):
    engine = EmbeddingEngine(EngineConfig(task="embed", progress=False), loaded=loaded_model)
    assert (engine.pooling.mode, engine.pooling.normalize) == ("lasttoken", True)
    texts = TEXTS[:10]
    ids = [engine.tokenizer.encode(t) for t in texts]
    ours = torch.tensor(run_engine(engine, ids))
    ref = torch.tensor(hf_computed["last_hidden"])  # transformers', normalized
    assert torch.nn.functional.cosine_similarity(ours, ref).min() >= 0.9999
    # batched vs alone: the same vector for a request whichever step it lands in
    alone = torch.tensor(run_engine(engine, ids[:1]))
    assert torch.nn.functional.cosine_similarity(alone, ours[:1]).item() >= 0.999999
