"""Which engine a config asks for: generation (`LLMEngine`) or embedding (`EmbeddingEngine`).

Both answer EngineCore's calls (add_tokenized_request, abort_request, step, stats, ...), so the
loop, the thread/process clients and AsyncLLM serve either one.
"""

from __future__ import annotations

from pagoda.engine.config import EngineConfig
from pagoda.engine.embedding_engine import EmbeddingEngine, wants_embedding
from pagoda.engine.llm_engine import LLMEngine

Engine = LLMEngine | EmbeddingEngine


def build_engine(config: EngineConfig) -> Engine:
    """Load the model (blocking) into the engine its task needs."""
    return EmbeddingEngine(config) if wants_embedding(config) else LLMEngine(config)
