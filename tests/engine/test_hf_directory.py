"""A Hugging Face model directory (config.json + safetensors + tokenizer files) loads and generates
token-identically to transformers. The model is a tiny random Llama written by transformers."""

from __future__ import annotations

import pytest
import torch

from pagoda.entrypoints.llm import LLM
from pagoda.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, loaded_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = loaded_model.tokenizer.hf
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, model


def test_hf_directory_matches_transformers(tiny_llama_dir):
    path, hf = tiny_llama_dir
    llm = LLM(model=str(path), kv_cache_memory=8 << 20, progress=False)
    assert llm.engine.model_config.num_layers == 3
    assert not llm.engine.model_config.tie_word_embeddings
    prompts = ["Hello there", "The capital of France is", "def f(x):\n    return"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = llm.tokenizer.encode(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a GGUF file nor a model directory"):
        LLM(model=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(model=str(tmp_path / "empty"))
