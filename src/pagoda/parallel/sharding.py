"""Cutting a loaded Llama model down to one rank's share, and the collectives that rejoin it.

Megatron's layout: qkv and gate_up are column-parallel (each rank computes its own heads and
intermediate columns, no communication), o_proj and down_proj row-parallel (each rank's partial
product summed by one all-reduce), the LM head vocabulary-parallel (each rank scores its rows of
the vocabulary, one all-gather). Embeddings and norms are replicated.

Two phases, because quantization swaps modules by name: `shard_weights` slices the fp32
`nn.Linear`s in place right after loading (so int8/int4 quantize only the rank's share, and each
linear records its `WeightSlice` so gguf cuts the file's blocks the same way, exactly), and
`attach_collectives` adds the all-reduce / all-gather as forward hooks once every module swap
(quantization, oneDNN packing) is done.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.models.config import ModelConfig
from pagoda.parallel.comm import TPGroup
from pagoda.parallel.partition import Shard
from pagoda.quant.group_weights import WeightSlice


def _span(r: range, scale: int = 1, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + r.start * scale, offset + r.stop * scale)


def _part(full: torch.Tensor, rows: torch.Tensor, cols: range | None = None) -> nn.Linear:
    """An fp32 linear holding `rows` x `cols` of `full` (a row index past its end: zeros). It
    records which part it holds, so a quantizer reading the file's own blocks (gguf) cuts
    them the same way."""
    part = WeightSlice(rows, cols if cols is not None else range(full.shape[1]))
    weight = part.take_rows(full)[:, part.cols.start:part.cols.stop]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    out.weight_slice = part
    return out


def shard_weights(model: nn.Module, cfg: ModelConfig, shard: Shard) -> None:
    """Slice every layer's projections and the LM head to `shard` (in place, fp32 nn.Linear)."""
    hd = cfg.head_dim
    q_size, kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
    qkv_rows = torch.cat([_span(shard.q_heads, hd), _span(shard.kv_heads, hd, q_size),
                          _span(shard.kv_heads, hd, q_size + kv_size)])
    gate_up_rows = torch.cat([_span(shard.intermediate),
                              _span(shard.intermediate, 1, cfg.intermediate_size)])
    heads_cols = range(shard.q_heads.start * hd, shard.q_heads.stop * hd)
    for layer in model.layers:  # type: ignore[union-attr]
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("qkv_proj", "o_proj"):
            if type(getattr(attn, name)) is not nn.Linear:
                raise ValueError("tensor parallelism shards fp32 weights before quantizing; "
                                 f"{name} is already {type(getattr(attn, name)).__name__}")
        attn.qkv_proj = _part(attn.qkv_proj.weight.data, qkv_rows)
        attn.o_proj = _part(attn.o_proj.weight.data, torch.arange(cfg.hidden_size), heads_cols)
        attn.num_heads, attn.num_kv_heads = len(shard.q_heads), len(shard.kv_heads)
        attn.q_size, attn.kv_size = attn.num_heads * hd, attn.num_kv_heads * hd
        mlp.gate_up_proj = _part(mlp.gate_up_proj.weight.data, gate_up_rows)
        mlp.down_proj = _part(mlp.down_proj.weight.data, torch.arange(cfg.hidden_size),
                              shard.intermediate)
    # untied: a slice of its own, the last rank's rows past the vocabulary zeros
    model.lm_head = _part(model.lm_head.weight.data, _span(shard.vocab))  # type: ignore


def attach_collectives(model: nn.Module, cfg: ModelConfig, group: TPGroup) -> None:
    """Sum the row-parallel partial products and gather the vocabulary slices, as hooks on
    the modules that are there now (call after every module swap)."""
    def all_reduce(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(out)

    def gather_vocab(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        return group.gather_last(out)[..., :cfg.vocab_size]

    for layer in model.layers:  # type: ignore[union-attr]
        layer.self_attn.o_proj.register_forward_hook(all_reduce)
        layer.mlp.down_proj.register_forward_hook(all_reduce)
    model.lm_head.register_forward_hook(gather_vocab)  # type: ignore[union-attr]
