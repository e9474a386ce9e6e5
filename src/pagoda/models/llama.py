"""Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, optional tied embeddings).

Projections are plain `nn.Linear` so quantization can swap them without touching this file.
q/k/v and gate/up are fused into single matmuls; `load_weights` stacks HF's separate tensors.
With `use_fused_ops` (quantized models on the CPU) the elementwise steps between the products
run as single C++ calls (layers/fused_ops.py); the torch expressions stay the reference path.
"""

from __future__ import annotations

import operator
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


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                store: KVStore, meta: AttentionMetadata, ops: FusedOps | None = None
                ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2 KVH) * hd)
        # fused: q and k rotated in place and k, v already in the cache
        written = ops is not None and ops.rope_write(qkv, positions, rope, self.num_heads,
                                                     self.num_kv_heads, store, meta.slot_mapping)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not written:
            q, k = rope(positions, q, k)
        o = paged_attention(q, k, v, store, meta, self.scale, written=written)
        return self.o_proj(o.view(num_tokens, self.q_size))


def _versions(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """The tensors' storages and in-place versions: a write through a tensor bumps its
    version, `param.data = other` moves its storage."""
    return list(map(torch.Tensor.data_ptr, tensors)), [t._version for t in tensors]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, F.silu)
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                store: KVStore, meta: AttentionMetadata) -> torch.Tensor:
        ops = self.fused
        if ops is None or not ops.applies(x):
            x = x + self.self_attn(self.input_layernorm(x), positions, rope, store, meta)
            return x + self.mlp(self.post_attention_layernorm(x))
        if ops.decode_layer(meta, store):
            out = self._in_one_call(ops, x, positions, rope, store, meta)
            if out is not None:
                return out
        h = ops.rms_norm(x, self.input_layernorm)
        x, h = ops.add_rms_norm(x, self.self_attn(h, positions, rope, store, meta, ops),
                                self.post_attention_layernorm)
        return x + self.mlp.down_proj(ops.silu_mul(self.mlp.gate_up_proj(h)))

    def operand_sources(self) -> list[tuple[dict, str, object]]:
        """What one_call_operands() is made from, as (dict, key, object) with dict[key] the
        object now: the four linears and two norms (in their parents' module dicts) and each
        one's weight parameter (a packed copy, e.g. fgemm's, is made from it once). Plain dict
        entries, so checking them every step costs microseconds, not nn.Module lookups."""
        attn, mlp = self.self_attn, self.mlp
        owners = [(attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"),
                  (mlp, "down_proj"), (self, "input_layernorm"),
                  (self, "post_attention_layernorm")]
        sources: list[tuple[dict, str, object]] = []
        for parent, name in owners:
            module = parent._modules[name]
            sources.append((parent._modules, name, module))
            if module is not None and isinstance(module._parameters.get("weight"), torch.Tensor):
                sources.append((module._parameters, "weight", module._parameters["weight"]))
        return sources

    def one_call_operands(self, ops: FusedOps, store: KVStore) -> tuple | None:
        """(norm1, norm2, [4 linears' operands], [their forms], k_blocks, v_blocks) as
        llama_decode_layer takes them, or None when a linear runs on neither qgemm nor wgemm."""
        attn, mlp = self.self_attn, self.mlp
        linears = [ops.native_operands(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                  mlp.down_proj)]
        if any(operands is None for operands in linears):
            return None
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        assert norm1.eps == norm2.eps and not norm1.offset and not norm2.offset
        k_blocks, v_blocks = store.cpu_blocks()  # type: ignore[misc]
        return (norm1.weight, norm2.weight, [w for w, _ in linears],  # type: ignore[misc]
                [f for _, f in linears], k_blocks, v_blocks)  # type: ignore[misc]

    def _in_one_call(self, ops: FusedOps, x: torch.Tensor, positions: torch.Tensor,
                     rope: RotaryEmbedding, store: KVStore, meta: AttentionMetadata
                     ) -> torch.Tensor | None:
        """The layer as one C++ call (bit-identical to the fused Python path below it), or None
        when a linear runs on neither qgemm nor wgemm."""
        operands = self.one_call_operands(ops, store)
        if operands is None:
            return None
        norm1, norm2, (qkv_w, o_w, gu_w, d_w), (qkv_f, o_f, gu_f, d_f), k, v = operands
        attn = self.self_attn
        ops.num_layer_calls += 1
        return ops.module.llama_decode_layer(
            x.contiguous(), norm1, norm2, self.input_layernorm.eps, qkv_w, qkv_f, o_w, o_f,
            gu_w, gu_f, d_w, d_f, positions, rope.cos, rope.sin_signed, attn.num_heads,
            attn.num_kv_heads, k, v, meta.slot_mapping, meta.decode_block_tables,
            meta.decode_context_lens, attn.scale)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # An empty `_weight`, no random init: the checkpoint overwrites it (a missing weight is
        # refused at load), and on the meta device, where the loaders build models, normal_
        # runs a Python decomposition that costs ~0.8 s of every start-up.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # built by post_load(), which every loader calls once the weights are real: computing
        # the tables on the meta device would import torch._dynamo (~1 s of start-up)
        self.rope: RotaryEmbedding | None = None
        self.fused: FusedOps | None = None
        # every layer as one C++ call (`_decode_stack`) and the KV stores it was built on; both
        # dropped when the ops change (`use_fused_ops`)
        self._stack: object | None = None
        self._stack_stores: list[KVStore] | None = None
        # what the stack's operands were made from (LlamaDecoderLayer.operand_sources: dicts,
        # keys and the objects they held, kept alive so no id is reused) and the weights'
        # storages and in-place versions: a change to any rebuilds the stack
        self._stack_sources: tuple[list[dict], list[str], list[object]] = ([], [], [])
        self._stack_versions: tuple[list[torch.Tensor], tuple[list[int], list[int]]] = (
            [], ([], []))

    def use_fused_ops(self, ops: FusedOps | None) -> None:
        """Run the elementwise steps through `ops` (None: torch's ops, the reference)."""
        self.fused = ops
        # a new engine prepares the model here: drop the stack, which holds the cache blocks of
        # the engine before, so they are freed before this engine allocates its own
        self._stack, self._stack_stores = None, None
        self._stack_sources, self._stack_versions = ([], [], []), ([], ([], []))
        for layer in self.layers:
            layer.fused = ops

    def post_load(self) -> None:
        """Re-tie embeddings and rebuild RoPE tables (built on the meta device, then loaded)."""
        cfg = self.config
        if cfg.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not if quantized
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_stores: list[KVStore], meta: AttentionMetadata | list[AttentionMetadata]
                ) -> torch.Tensor:
        """input_ids, positions: (T,). Returns final hidden states (T, hidden)."""
        return self.final_norm(self.run_layers(self.embed(input_ids), positions, kv_stores, meta))

    # The three parts of forward(), for pipeline stages (parallel/pipeline.py): a stage holds a
    # contiguous slice of `layers` and one KV store (and metadata entry) per layer it holds.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, kv_stores: list[KVStore],
                   meta: AttentionMetadata | list[AttentionMetadata]) -> torch.Tensor:
        assert self.rope is not None, "call post_load()"
        # one KV group (every layer the same metadata, as a list or not): maybe one call
        only = meta if isinstance(meta, AttentionMetadata) else meta[0] if meta and all(
            m is meta[0] for m in meta) else None
        stack = self._decode_stack(x, kv_stores, only) if only is not None else None
        if stack is not None:
            assert self.fused is not None and only is not None
            self.fused.num_layer_calls += len(self.layers)
            return stack.run(x.contiguous(), positions,  # type: ignore[attr-defined]
                             only.slot_mapping, only.decode_block_tables,
                             only.decode_context_lens)
        for i, (layer, store) in enumerate(zip(self.layers, kv_stores, strict=True)):
            x = layer(x, positions, self.rope, store, layer_meta(meta, i))
        return x

    def _decode_stack(self, x: torch.Tensor, kv_stores: list[KVStore],
                      meta: AttentionMetadata) -> object | None:
        """Every layer in one C++ call this step (kernels/csrc/decode_layer.h: the same
        llama_decode_layer per layer, without returning to Python between layers), or None when
        a layer would not run as one call. Built once per set of KV stores and of the operands'
        sources (the modules and weights, checked every step: they do not change while serving,
        but a caller may load new weights into a served model)."""
        ops = self.fused
        if (ops is None or not ops.whole_model or not kv_stores or not ops.applies(x)
                or not ops.decode_layer(meta, kv_stores[0])):
            return None
        built = self._stack_stores
        if (built is None or len(built) != len(kv_stores)
                or any(a is not b for a, b in zip(built, kv_stores, strict=True))
                or not self._stack_current()):
            self._stack, self._stack_stores = self._build_stack(ops, kv_stores), list(kv_stores)
            sources = [x for layer in self.layers for x in layer.operand_sources()]
            dicts, keys, objs = (list(column) for column in zip(*sources, strict=True))
            # inference tensors have no version counter (model weights are made outside
            # inference mode): only their identity is checked, with the other sources'
            tensors = [t for t in objs if isinstance(t, torch.Tensor) and not t.is_inference()]
            self._stack_sources = (dicts, keys, objs)
            self._stack_versions = (tensors, _versions(tensors))
        return self._stack

    def _stack_current(self) -> bool:
        """Whether the stack's operands still come from the model's modules and weights as
        they are: a weight replaced or changed in place since the build (new weights loaded into
        a served model) would otherwise go unseen by decode steps, which only run the stack.
        Plain dict lookups, storages and version counters: ~30 us a step for 30 layers."""
        dicts, keys, objs = self._stack_sources
        tensors, versions = self._stack_versions
        return (all(map(operator.is_, map(dict.get, dicts, keys), objs))
                and _versions(tensors) == versions)

    def _build_stack(self, ops: FusedOps, kv_stores: list[KVStore]) -> object | None:
        assert self.rope is not None
        first = self.layers[0]
        attn = first.self_attn
        stack = ops.module.LlamaDecodeStack(first.input_layernorm.eps, attn.num_heads,
                                            attn.num_kv_heads, attn.scale, self.rope.cos,
                                            self.rope.sin_signed)
        for layer, store in zip(self.layers, kv_stores, strict=True):
            operands = (layer.one_call_operands(ops, store) if layer.fused is ops
                        and store.cpu_blocks() is not None else None)
            if operands is None or layer.input_layernorm.eps != first.input_layernorm.eps:
                return None
            stack.add_layer(*operands)
        return stack

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.applies(x):
            return self.fused.rms_norm(x, self.norm)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_fused_weights(self, self.config, weights)

