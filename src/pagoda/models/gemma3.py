"""Gemma 3 decoder (text only).

Differences from Llama, each mirrored from the reference implementation so greedy output matches:
- embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype first;
- every layer has four (1 + weight) RMSNorms: before and after attention, before and after the MLP
  (the "post" norms apply to the sublayer output before it joins the residual stream);
- q and k are RMS-normalized per head (QK-norm) before RoPE;
- local layers attend to a sliding window of the last `sliding_window` positions and use their
  own RoPE base; global layers attend to everything and use the global base (with optional
  linear position scaling);
- attention scale is query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5;
- the MLP is GeGLU with the tanh-approximated GELU;
- final logits are optionally soft-capped: cap * tanh(logits / cap).

Projections are plain `nn.Linear` (fused `qkv_proj`, `gate_up_proj`) so quantization can swap them.
With `use_fused_ops` (on the CPU when the linears are quantized or fp32 on fgemm, as for Llama)
the norms, QK-norm, RoPE with the cache write and the residual adds run as single C++ calls
(layers/fused_ops.py); the torch expressions stay the reference path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention import paged_attention
from pagoda.layers.attention_metadata import AttentionMetadata, layer_meta
from pagoda.layers.fused_ops import FusedOps
from pagoda.layers.mlp import GatedMLP
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.config import ModelConfig
from pagoda.models.weight_loading import load_fused_weights


def _norm(dim: int, cfg: ModelConfig) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, offset=1.0)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = _norm(cfg.head_dim, cfg)
        self.k_norm = _norm(cfg.head_dim, cfg)
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        self.scale = scalar ** -0.5
        self.window = cfg.window_of(layer)  # None on global layers

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                store: KVStore, meta: AttentionMetadata, window: int | None,
                ops: FusedOps | None = None) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2 KVH) * hd)
        written = False
        if ops is not None:  # q and k normalized in place, then rotated and k, v cached
            self._norm_heads(ops, qkv, 0, self.num_heads, self.q_norm)
            self._norm_heads(ops, qkv, self.q_size, self.num_kv_heads, self.k_norm)
            written = ops.rope_write(qkv, positions, rope, self.num_heads, self.num_kv_heads,
                                     store, meta.slot_mapping)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if ops is None:
            q, k = self.q_norm(q), self.k_norm(k)
        if not written:
            q, k = rope(positions, q, k)
        o = paged_attention(q, k, v, store, meta, self.scale, window, written=written)
        return self.o_proj(o.view(num_tokens, self.q_size))

    def _norm_heads(self, ops: FusedOps, qkv: torch.Tensor, start: int, heads: int,
                    norm: RMSNorm) -> None:
        """RMS-normalize `heads` heads of every row of qkv from column `start`, in place."""
        part = qkv[:, start:start + heads * self.head_dim]
        part.copy_(ops.rms_norm(part.reshape(-1, self.head_dim), norm).view_as(part))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = _norm(cfg.hidden_size, cfg)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.post_attention_layernorm = _norm(cfg.hidden_size, cfg)
        self.pre_feedforward_layernorm = _norm(cfg.hidden_size, cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, _gelu_tanh)
        self.post_feedforward_layernorm = _norm(cfg.hidden_size, cfg)
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                store: KVStore, meta: AttentionMetadata, window: int | None) -> torch.Tensor:
        ops = self.fused
        if ops is None or not ops.applies(x):
            h = self.self_attn(self.input_layernorm(x), positions, rope, store, meta, window)
            x = x + self.post_attention_layernorm(h)
            h = self.mlp(self.pre_feedforward_layernorm(x))
            return x + self.post_feedforward_layernorm(h)
        h = self.self_attn(ops.rms_norm(x, self.input_layernorm), positions, rope, store, meta,
                           window, ops)
        x, h = ops.add_rms_norm(x, ops.rms_norm(h, self.post_attention_layernorm),
                                self.pre_feedforward_layernorm)
        return x + ops.rms_norm(self.mlp(h), self.post_feedforward_layernorm)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.architecture == "gemma3"
        assert cfg.sliding_window is not None and len(cfg.layer_sliding) == cfg.num_layers, \
            "gemma3 needs a sliding window and a per-layer sliding/global pattern"
        self.config = cfg
        # An empty `_weight`, no random init: the checkpoint overwrites it (a missing weight is
        # refused at load), and on the meta device, where the loaders build models, normal_
        # runs a Python decomposition that costs ~0.8 s of every start-up.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = _norm(cfg.hidden_size, cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # built by post_load(), which every loader calls once the weights are real: computing
        # the tables on the meta device would import torch._dynamo (~1 s of start-up)
        self.rope_global: RotaryEmbedding | None = None
        self.rope_local: RotaryEmbedding | None = None

    def use_fused_ops(self, ops: FusedOps | None) -> None:
        """Run the elementwise steps through `ops` (None: torch's ops, the reference)."""
        for layer in self.layers:
            layer.fused = ops

    def post_load(self) -> None:
        """Re-tie embeddings and rebuild the RoPE tables (built on the meta device, then loaded)."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        # Linear scaling divides positions here and inv_freq in transformers; Gemma 3's factors
        # (1 or 8) are powers of two, for which both give the same floats.
        self.rope_global = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope_theta,
                                           cfg.rope_scaling_factor)
        self.rope_local = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, local_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_stores: list[KVStore], meta: AttentionMetadata | list[AttentionMetadata]
                ) -> torch.Tensor:
        """input_ids, positions: (T,). Returns final hidden states (T, hidden)."""
        return self.final_norm(self.run_layers(self.embed(input_ids), positions, kv_stores, meta))

    # The three parts of forward(), for pipeline stages (parallel/pipeline.py): a stage holds a
    # contiguous slice of `layers` (each knows whether it slides) and their KV stores.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        # The scale is rounded to the weights' dtype before multiplying, as Gemma was trained.
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, kv_stores: list[KVStore],
                   meta: AttentionMetadata | list[AttentionMetadata]) -> torch.Tensor:
        assert self.rope_global is not None and self.rope_local is not None, "call post_load()"
        window = self._step_window(layer_meta(meta, 0))
        for i, (layer, store) in enumerate(zip(self.layers, kv_stores, strict=True)):
            m = layer_meta(meta, i)
            if layer.self_attn.window is None:
                x = layer(x, positions, self.rope_global, store, m, None)
            else:
                x = layer(x, positions, self.rope_local, store, m, window)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _step_window(self, meta: AttentionMetadata) -> int | None:
        """The sliding window, or None when no context in this step is longer than it.

        A window that hides nothing equals plain causal attention, which is cheaper (no mask)
        and is the path transformers takes too in that case.
        """
        window = self.config.sliding_window
        assert window is not None
        longest = max((s.num_cached + s.num_tokens for s in meta.prefills), default=0)
        if meta.num_decode:
            assert meta.decode_context_lens is not None
            longest = max(longest, int(meta.decode_context_lens.max()))
        return window if longest > window else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # (T, vocab)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named fp32 tensors; norm weights are HF's w (the module computes 1 + w)."""
        load_fused_weights(self, self.config, weights)
