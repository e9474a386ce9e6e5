"""`GGUFWeightSource`: a GGUF file's quantized blocks, addressed by the model's linear names.

The model's linears are named by the model contract (`layers.<i>.self_attn.qkv_proj`,
`layers.<i>.mlp.gate_up_proj`, `lm_head`, ...): the layer index is the last integer in the module
name and the kind is its last component. Fused projections are rebuilt by stacking the file's
matrices row-wise (q, k, v and gate, up), which is exact because blocks run along the input
dimension. For Llama the q and k rows are un-permuted exactly as the fp32 loader does (llama.cpp
stores them interleaved for its RoPE layout); a row permutation of block rows is exact too.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import gguf
import numpy as np
import torch

from pagoda.quant.fast_gguf_reader import FastGGUFReader
from pagoda.quant.gguf_blocks import SUPPORTED, decode_blocks
from pagoda.quant.group_weights import GroupWeights, cat_rows, quantize_int8_per_channel

# kind -> the GGUF tensors (within block i) stacked row-wise to form it
_PARTS = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def unpermute_order(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row order turning llama.cpp's interleaved q/k rows back into the half-split layout.

    Per head the file holds rows as (head_dim/2, 2); the model expects (2, head_dim/2).
    new_row[i] = file_row[order[i]].
    """
    head_dim = num_rows // num_heads
    order = torch.arange(num_rows).reshape(num_heads, head_dim // 2, 2)
    return order.transpose(1, 2).reshape(-1)


class GGUFWeightSource:
    def __init__(self, path: str):
        self.path = path
        self.reader = open_gguf(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self._field("general.architecture")
        self.num_heads = int(self._field(f"{self.architecture}.attention.head_count"))
        self.num_kv_heads = int(self._field(f"{self.architecture}.attention.head_count_kv",
                                            self.num_heads))

    def _field(self, key: str, default: object = None) -> object:
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise ValueError(f"{self.path}: GGUF metadata lacks {key}")
            return default
        value = field.parts[field.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else value[0]

    def weights_for(self, module_name: str, kind: str) -> tuple[GroupWeights, str]:
        """The GroupWeights of one model linear and a description of the block types used."""
        names = self._tensor_names(module_name, kind)
        parts, qtypes = [], []
        for name in names:
            w, qtype = self._decode(name)
            if self.architecture == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = self.num_heads if "attn_q" in name else self.num_kv_heads
                w = w.permute_rows(unpermute_order(w.shape[0], heads))
            parts.append(w)
            qtypes.append(qtype)
        merged = parts[0] if len(parts) == 1 else cat_rows(parts)
        return merged, "+".join(sorted(set(qtypes)))

    def _tensor_names(self, module_name: str, kind: str) -> list[str]:
        if kind == "lm_head":
            # Tied embeddings (SmolLM2): the output projection is the token embedding.
            return ["output.weight" if "output.weight" in self.tensors else "token_embd.weight"]
        if kind not in _PARTS:
            raise ValueError(f"no GGUF mapping for linear kind {kind!r}")
        layers = _LAYER.findall(module_name)
        if not layers:
            raise ValueError(f"cannot find a layer index in module name {module_name!r}")
        return [f"blk.{layers[-1]}.{part}.weight" for part in _PARTS[kind]]

    def _decode(self, name: str) -> tuple[GroupWeights, str]:
        if name not in self.tensors:
            raise ValueError(f"{self.path} has no tensor {name}")
        t = self.tensors[name]
        qtype = t.tensor_type.name
        num_cols = int(t.shape[0])  # GGUF lists dimensions innermost first: (K, N)
        if qtype in SUPPORTED:
            return decode_blocks(t.data, qtype, num_cols), qtype
        # Float or unsupported block types: dequantize with gguf and round to per-row int8
        # (one group spanning the row), so every part still fits the GroupWeights form.
        dense = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, num_cols)
        q, scale = quantize_int8_per_channel(torch.from_numpy(np.ascontiguousarray(dense)))
        return GroupWeights(q, scale[:, None], None, num_cols, bits=8), f"{qtype}->int8"


@lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int) -> FastGGUFReader:
    return FastGGUFReader(path)


def open_gguf(path: str) -> FastGGUFReader:
    """A GGUF file's reader, shared by every load of the same file in this process: gguf parses
    the whole metadata (every vocabulary string) up front, seconds per open. Readers are
    read-only views of a memory map; a file changed on disk gets a new one."""
    st = os.stat(path)
    return _reader(os.path.realpath(path), st.st_size, st.st_mtime_ns)
