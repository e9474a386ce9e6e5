"""Read a GGUF file: model config from its metadata, weights dequantized to HF tensor names.

Weights are yielded under Hugging Face names so every model class has one `load_weights` path for
both GGUF files and safetensors checkpoints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pagoda.models.config import ModelConfig

# GGUF tensor name (per layer, after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_post_norm": "post_feedforward_layernorm",
}
# llama.cpp's Gemma 3 names: ffn_norm is the pre-feedforward norm, post_ffw_norm the post one.
_GEMMA3_LAYER_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(gguf_name: str, architecture: str) -> str:
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if architecture == "gemma3" and part in _GEMMA3_LAYER_NAMES:
            # Gemma 3 has four norms per layer; llama.cpp's names map onto them differently.
            mapped = _GEMMA3_LAYER_NAMES[part]
        else:
            mapped = _LAYER_NAMES[part]
        return f"model.layers.{layer}.{mapped}.{kind}"
    base, kind = gguf_name.rsplit(".", 1)
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half-split layout)."""
    out_features = w.shape[0]
    head_dim = out_features // num_heads
    return (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFCheckpoint:
    def __init__(self, path: str):
        from pagoda.quant.gguf_source import open_gguf

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such GGUF file: {path}")
        self.path = path
        self.reader = open_gguf(path)
        self.architecture = str(self._field("general.architecture"))
        self.config = self._read_config()

    def _field(self, key: str, default: object = None) -> object:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch(self, key: str, default: object = None) -> object:
        return self._field(f"{self.architecture}.{key}", default)

    def _read_config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in ("llama", "gemma3"):
            raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama, gemma3)")
        hidden = int(self._arch("embedding_length"))
        num_heads = int(self._arch("attention.head_count"))
        head_dim = int(self._arch("attention.key_length", 0) or hidden // num_heads)
        embd = next(t for t in self.reader.tensors if t.name == "token_embd.weight")
        vocab = int(self._arch("vocab_size", 0) or embd.shape[-1])
        has_output = any(t.name == "output.weight" for t in self.reader.tensors)
        eos = self._field("tokenizer.ggml.eos_token_id")
        bos = self._field("tokenizer.ggml.bos_token_id")
        common = dict(
            architecture=arch,
            name=str(self._field("general.name", os.path.basename(self.path))),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._arch("feed_forward_length")),
            num_layers=int(self._arch("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(self._arch("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_model_len=int(self._arch("context_length")),
            rms_norm_eps=float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._arch("rope.freq_base", 10000.0)),
            tie_word_embeddings=not has_output,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )
        if arch == "gemma3":
            from pagoda.models.gemma3_config import gemma3_extras

            common.update(gemma3_extras(self))
        return ModelConfig(**common)

    def weights(self, progress: bool = True, skip: Callable[[str], bool] | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, fp32 tensor) for every tensor but those `skip` names, dequantizing
        quantized blocks (skipped ones are never decoded)."""
        cfg = self.config
        permute = self.architecture == "llama"
        # llama.cpp stores Gemma's RMSNorm weights as (1 + w); HF's modules hold w.
        norm_offset = 1.0 if self.architecture == "gemma3" else 0.0
        for t in tqdm(self.reader.tensors, desc="Loading weights", unit="tensor",
                      disable=not progress):
            name = hf_name(t.name, self.architecture)
            if skip is not None and skip(name):
                continue
            w = _dequantize(t)
            if permute and name.endswith("q_proj.weight"):
                w = unpermute_rows(w, cfg.num_heads)
            elif permute and name.endswith("k_proj.weight"):
                w = unpermute_rows(w, cfg.num_kv_heads)
            elif norm_offset and name.endswith("norm.weight"):
                w = w - np.float32(norm_offset)
            yield name, torch.from_numpy(np.array(w, copy=True) if not w.flags.writeable else w)


def _dequantize(t) -> np.ndarray:
    """fp32 values of one GGUF tensor. The block types Pagoda decodes natively go through torch
    (`GroupWeights.dequantize` repeats gguf's arithmetic bit for bit: tests/quant/test_gguf.py);
    every tensor of Gemma 3 270M's GGUF in 3.0 s against gguf-py's 7.8 s (2-core Zen 4), so
    gguf-py only handles the other types."""
    import gguf

    from pagoda.quant.gguf_blocks import SUPPORTED, decode_blocks

    if t.tensor_type.name in SUPPORTED and t.data.ndim == 2:
        return decode_blocks(t.data, t.tensor_type.name, int(t.shape[0])).dequantize().numpy()
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
