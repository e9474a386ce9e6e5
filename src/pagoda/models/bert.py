"""BERT-family encoder (all-MiniLM-L6-v2 and its kin): bidirectional attention, post-LayerNorm,
learned absolute positions, GELU feed-forward.

Tokens arrive packed: the step's sequences concatenated into one (T,) tensor with `lengths`, so
the linears (nearly all of the work) never compute padding. Attention is per sequence in one of
two forms, chosen by measurement (benchmarks/embeddings.py, docs/embeddings.md):
  * "padded": scatter the packed q/k/v into (B, heads, L_max, hd), one masked SDPA call, gather
    back — one kernel call per layer, padding only inside attention;
  * "varlen": one unmasked SDPA call per sequence on its slice of the packed tensors.
Both compute the same per-sequence softmax; they differ only in reduction order (last ulp).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES = ("padded", "varlen")


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class PackedBatch:
    """A step's sequences, concatenated; `padded_index` places them in (B, L_max) for padded
    attention."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, from 0 in each sequence
    lengths: list[int]

    @classmethod
    def of(cls, sequences: list[list[int]], device: torch.device) -> PackedBatch:
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
        pos = torch.cat([torch.arange(len(s), device=device) for s in sequences])
        return cls(ids, pos, [len(s) for s in sequences])

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) flat position of each packed token in a (B * L_max) grid, and the (B, L_max)
        mask of real tokens."""
        device = self.positions.device
        lengths = torch.tensor(self.lengths, device=device)
        max_len = max(self.lengths)
        row = torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)
        valid = torch.arange(max_len, device=device)[None, :] < lengths[:, None]
        return row * max_len + self.positions, valid


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, batch: PackedBatch, mode: str,
                grid: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (p(x).view(t, self.num_heads, self.head_dim)
                   for p in (self.query, self.key, self.value))
        if mode == "varlen":
            out, start = torch.empty_like(q), 0
            for n in batch.lengths:
                qs, ks, vs = (a[start:start + n].transpose(0, 1) for a in (q, k, v))
                out[start:start + n] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
                start += n
            return out.reshape(t, -1)
        assert grid is not None
        flat, valid = grid
        b, max_len = valid.shape

        def pad(a: torch.Tensor) -> torch.Tensor:
            g = a.new_zeros(b * max_len, self.num_heads, self.head_dim)
            g[flat] = a
            return g.view(b, max_len, self.num_heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v),
                                           attn_mask=valid[:, None, None, :])
        return o.transpose(1, 2).reshape(b * max_len, -1)[flat]


class BertLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.hidden_act != "gelu":
            raise ValueError(f"unsupported BERT activation {cfg.hidden_act!r} (only gelu)")
        self.attention = BertSelfAttention(cfg)
        self.attention_output = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, batch: PackedBatch, mode: str,
                grid: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = self.attention_norm(x + self.attention_output(self.attention(x, batch, mode, grid)))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, attention: str = "padded"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}")
        self.config, self.attention = cfg, attention
        # uninitialised: the checkpoint overwrites it (a missing weight is refused at load)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embedding_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Last hidden states of the packed tokens, (T, hidden). Every token is segment 0 (one
        text per sequence, as sentence-transformers encodes)."""
        x = (self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)
             + self.token_type_embeddings.weight[0])
        x = self.embedding_norm(x)
        grid = batch.padded_index() if self.attention == "padded" else None
        for layer in self.layers:
            x = layer(x, batch, self.attention, grid)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face BertModel names (an optional `bert.` prefix is dropped; the pooler and
        any task head are not used by embedding models)."""
        params = dict(self.named_parameters())
        seen = set()
        for name, tensor in weights:
            target = _our_name(name.removeprefix("bert."))
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"unexpected BERT weight {name!r}")
            if params[target].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(params[target].shape)}")
            with torch.no_grad():
                params[target].copy_(tensor)
            seen.add(target)
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(f"BERT checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")


_RENAMES = (
    ("encoder.layer.", "layers."),
    (".attention.self.", ".attention."),
    (".attention.output.dense.", ".attention_output."),
    (".attention.output.LayerNorm.", ".attention_norm."),
    (".intermediate.dense.", ".intermediate."),
    (".output.dense.", ".output."),
    (".output.LayerNorm.", ".output_norm."),
)


def _our_name(hf_name: str) -> str | None:
    if hf_name.startswith(("pooler.", "cls.")) or hf_name.endswith("position_ids"):
        return None
    if hf_name.startswith("embeddings."):
        name = hf_name.removeprefix("embeddings.")
        return "embedding_norm." + name.removeprefix("LayerNorm.") \
            if name.startswith("LayerNorm.") else name
    for old, new in _RENAMES:
        hf_name = hf_name.replace(old, new)
    return hf_name
