"""Load an encoder (embedding) model directory: BERT weights, its tokenizer, and how it pools.

A directory in sentence-transformers' layout (modules.json, 1_Pooling/config.json,
sentence_bert_config.json) is read for pooling, normalization and the sequence length the model
was trained to embed; nothing is hard-coded per model. A bare BertModel directory pools by mean
and normalizes (the sentence-transformers default for BERT).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from pagoda.layers.pooler import PoolingConfig
from pagoda.loader.hf_loader import safetensors_files, safetensors_weights
from pagoda.loader.model_loader import LoadedModel, materialize
from pagoda.loader.tokenizer import Tokenizer
from pagoda.models.bert import BertEncoder, EncoderConfig
from pagoda.models.config import ModelConfig

ENCODER_TYPES = ("bert",)


@dataclass
class LoadedEncoder:
    loaded: LoadedModel  # its `config` describes the encoder in ModelConfig's terms ("bert")
    pooling: PoolingConfig


def is_encoder_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        return json.load(f).get("model_type") in ENCODER_TYPES


def load_encoder(path: str, device: str = "cpu", attention: str = "padded") -> LoadedEncoder:
    start = time.perf_counter()
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    cfg = EncoderConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        max_position_embeddings=raw["max_position_embeddings"],
        type_vocab_size=raw.get("type_vocab_size", 2),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-12), hidden_act=raw.get("hidden_act", "gelu"))
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported")
    files = safetensors_files(path)
    with torch.device("meta"):
        net = BertEncoder(cfg, attention)
    net = materialize(net, device)
    net.load_weights(safetensors_weights(files, progress=False))
    net.eval()
    pooling = PoolingConfig.from_sentence_transformers(path) or PoolingConfig("mean", True)
    max_len = cfg.max_position_embeddings
    st_config = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(st_config):
        with open(st_config) as f:
            max_len = min(max_len, json.load(f).get("max_seq_length") or max_len)
    tokenizer = Tokenizer.from_pretrained(path)
    model_config = ModelConfig(
        architecture="bert", name=os.path.basename(os.path.normpath(path)),
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
        max_model_len=max_len)
    loaded = LoadedModel(net, model_config, tokenizer, path, time.perf_counter() - start)
    return LoadedEncoder(loaded, pooling)
