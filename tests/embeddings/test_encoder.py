"""The encoder path against sentence-transformers on the same files: every vector within cosine
0.9999 (measured: 1 - 1e-7), alone or batched, both attention forms, and pooling read from the
model's own config rather than assumed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.embedding_engine import EmbeddingEngine
from tests.embeddings.conftest import MINILM, run_engine
from tests.embeddings.texts import TEXTS

MIN_COSINE = 0.9999


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def tokenized(engine: EmbeddingEngine, texts: list[str]) -> list[list[int]]:
    """As the server tokenizes with truncate_prompt_tokens = the model's limit (256), which is
    what sentence-transformers does to every input."""
    return engine.tokenizer.hf(texts, truncation=True,
                               max_length=engine.max_model_len)["input_ids"]


@pytest.fixture(scope="module", params=["padded", "varlen"])
def engine(request):
    return EmbeddingEngine(EngineConfig(model=MINILM, embed_attention=request.param,
                                        progress=False))


def test_reads_pooling_and_length_from_the_sentence_transformers_files(engine):
    assert (engine.pooling.mode, engine.pooling.normalize) == ("mean", True)
    assert engine.max_model_len == 256  # sentence_bert_config.json, not the 512 positions
    assert len(tokenized(engine, [TEXTS[-4]])[0]) == 256  # the long input is cut


def test_batched_vectors_match_sentence_transformers(engine, sentence_transformer):
    ours = run_engine(engine, tokenized(engine, TEXTS))
    ref = sentence_transformer.encode(TEXTS, batch_size=64)
    assert len(TEXTS) >= 30
    assert cosines(ours, ref).min() >= MIN_COSINE
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_each_input_alone_matches_sentence_transformers_and_its_batched_vector(
        engine, sentence_transformer):
    ids = tokenized(engine, TEXTS)
    batched = run_engine(engine, ids)
    alone = [run_engine(engine, [s])[0] for s in ids]
    assert cosines(alone, sentence_transformer.encode(TEXTS)).min() >= MIN_COSINE
    assert cosines(alone, batched).min() >= 0.999999


def test_the_token_budget_splits_steps_without_changing_vectors(sentence_transformer):
    small = EmbeddingEngine(EngineConfig(model=MINILM, max_num_batched_tokens=300,
                                         max_num_seqs=5, progress=False))
    ids = tokenized(small, TEXTS)
    for i, s in enumerate(ids):
        small.add_tokenized_request(f"r{i}", None, s, None)
    sizes = []
    while small.has_unfinished_requests():
        sizes.append(len(small.step()))
    assert max(sizes) <= 5 and len(sizes) > len(TEXTS) // 5
    ours = run_engine(small, ids)
    assert cosines(ours, sentence_transformer.encode(TEXTS)).min() >= MIN_COSINE


def test_a_changed_pooling_config_is_followed(minilm_dir, tmp_path):
    """CLS pooling without Normalize, written into a copy of the model's folder: Pagoda and
    sentence-transformers both follow the files."""
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "minilm-cls"
    shutil.copytree(minilm_dir, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(os.path.join(minilm_dir, "model.safetensors"), folder / "model.safetensors")
    modules = [m for m in json.loads((folder / "modules.json").read_text())
               if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    engine = EmbeddingEngine(EngineConfig(model=str(folder), progress=False))
    assert (engine.pooling.mode, engine.pooling.normalize) == ("cls", False)
    texts = TEXTS[:8]
    ours = np.asarray(run_engine(engine, tokenized(engine, texts)))
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert np.abs(ours - ref).max() < 1e-4 and abs(np.linalg.norm(ours[0]) - 1) > 1e-3


def test_unsupported_modules_are_refused(minilm_dir, tmp_path):
    folder = tmp_path / "minilm-dense"
    shutil.copytree(minilm_dir, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(os.path.join(minilm_dir, "model.safetensors"), folder / "model.safetensors")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        EmbeddingEngine(EngineConfig(model=str(folder), progress=False))


def test_bad_requests_are_refused_before_queueing(engine):
    from pagoda.engine.request_validator import RequestError

    for ids in ([], [1] * 257, [30522]):
        with pytest.raises(RequestError):
            engine.add_tokenized_request("bad", None, ids, None)
    with pytest.raises(RequestError, match="does not generate"):
        from pagoda.sampling.params import SamplingParams

        engine.add_tokenized_request("gen", None, [101, 102], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_abort_drops_a_waiting_request(engine):
    engine.add_tokenized_request("a", None, [101, 7592, 102], None)
    engine.add_tokenized_request("b", None, [101, 2088, 102], None)
    out = engine.abort_request("a", "abort", "gone")
    assert out is not None and out.finished and out.error == "gone"
    assert [o.req_id for o in engine.step()] == ["b"]
    assert engine.abort_request("b") is None  # already answered


def test_offline_llm_embed(sentence_transformer):
    from pagoda.entrypoints.llm import LLM

    llm = LLM(MINILM, progress=False)
    ours = llm.embed(TEXTS, truncate=True)
    assert cosines(ours, sentence_transformer.encode(TEXTS)).min() >= MIN_COSINE
    with pytest.raises(ValueError, match="at most 256"):
        llm.embed([TEXTS[-4]])
