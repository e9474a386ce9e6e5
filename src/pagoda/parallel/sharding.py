"""Cutting a loaded Llama model down to one rank's share, and the collectives that rejoin it.

Megatron's layout: qkv and gate_up are column-parallel (each rank computes its own heads and
intermediate columns, no communication), o_proj and down_proj row-parallel (each rank's partial
product summed by one all-reduce), the LM head vocabulary-parallel (each rank scores its rows of
the vocabulary, one all-gather). Embeddings and norms are replicated.

Two phases, because quantization swaps modules by name: `shard_weights` slices the fp32
`nn.Linear`s in place right after loading (so int8/int4 quantize only the rank's share), and
`attach_collectives` adds the all-reduce / all-gather as forward hooks once every module swap
(quantization, oneDNN packing) is done.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.models.config import ModelConfig
from pagoda.parallel.comm import TPGroup
from pagoda.parallel.partition import Shard


def _linear(weight: torch.Tensor) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    return out


def _rows(t: torch.Tensor, r: range, scale: int = 1) -> torch.Tensor:
    return t[r.start * scale:r.stop * scale]


def shard_weights(model: nn.Module, cfg: ModelConfig, shard: Shard) -> None:
    """Slice every layer's projections and the LM head to `shard` (in place, fp32 nn.Linear)."""
    hd = cfg.head_dim
    q_size, kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
    for layer in model.layers:  # type: ignore[union-attr]
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("qkv_proj", "o_proj"):
            if type(getattr(attn, name)) is not nn.Linear:
                raise ValueError("tensor parallelism shards fp32 weights before quantizing; "
                                 f"{name} is already {type(getattr(attn, name)).__name__}")
        w = attn.qkv_proj.weight.data
        q, k, v = w[:q_size], w[q_size:q_size + kv_size], w[q_size + kv_size:]
        attn.qkv_proj = _linear(torch.cat([_rows(q, shard.q_heads, hd),
                                           _rows(k, shard.kv_heads, hd),
                                           _rows(v, shard.kv_heads, hd)]))
        attn.o_proj = _linear(_rows(attn.o_proj.weight.data.t(), shard.q_heads, hd).t())
        attn.num_heads, attn.num_kv_heads = len(shard.q_heads), len(shard.kv_heads)
        attn.q_size, attn.kv_size = attn.num_heads * hd, attn.num_kv_heads * hd
        gate, up = mlp.gate_up_proj.weight.data.chunk(2, dim=0)
        mlp.gate_up_proj = _linear(torch.cat([_rows(gate, shard.intermediate),
                                              _rows(up, shard.intermediate)]))
        mlp.down_proj = _linear(_rows(mlp.down_proj.weight.data.t(), shard.intermediate).t())
    head = model.lm_head.weight.data  # type: ignore[union-attr]
    padded = torch.zeros(shard.padded_vocab, head.shape[1], dtype=head.dtype, device=head.device)
    padded[:head.shape[0]] = head
    model.lm_head = _linear(_rows(padded, shard.vocab))  # untied: a slice of its own


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
