"""Gemma 3 configuration: the ModelConfig fields beyond Llama's, from GGUF metadata or HF config.

Gemma 3 interleaves local (sliding-window) and global attention layers, and the two kinds use
different RoPE bases. Where a source leaves a setting out, the fallback is the value both
llama.cpp and transformers use for Gemma 3 when it is missing, so our model and the reference
agree on the same file:

- layer pattern: every `SLIDING_WINDOW_PATTERN`-th layer (1-based) is global, the others local;
- local RoPE base `DEFAULT_LOCAL_THETA`, global RoPE base `DEFAULT_GLOBAL_THETA`;
- attention scale `query_pre_attn_scalar ** -0.5` with `query_pre_attn_scalar = head_dim`
  (GGUF records no scalar; llama.cpp scales by head_dim, transformers' default is 256 = head_dim
  of every Gemma 3 size that has such a GGUF).
"""

from __future__ import annotations

from typing import Any

SLIDING_WINDOW_PATTERN = 6
DEFAULT_LOCAL_THETA = 10_000.0
DEFAULT_GLOBAL_THETA = 1_000_000.0
# transformers' name for the tanh-approximated GELU that Gemma uses in its gated MLP
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


def sliding_layers(num_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> tuple[bool, ...]:
    """True for local (sliding-window) layers: all but every `pattern`-th one."""
    return tuple(bool((i + 1) % pattern) for i in range(num_layers))


def gemma3_extras(checkpoint: Any) -> dict[str, Any]:
    """Gemma 3 fields of ModelConfig from a GGUFCheckpoint's metadata (`gemma3.*` keys)."""
    arch = checkpoint._arch
    num_layers = int(arch("block_count"))
    head_dim = int(arch("attention.key_length"))
    window = arch("attention.sliding_window")
    if window is None:
        raise ValueError("gemma3 GGUF lacks gemma3.attention.sliding_window")
    layer_sliding = _gguf_pattern(arch("attention.sliding_window_pattern"), num_layers)

    extras: dict[str, Any] = dict(
        sliding_window=int(window),
        layer_sliding=layer_sliding,
        rope_theta=float(arch("rope.freq_base", DEFAULT_GLOBAL_THETA)),
        rope_local_theta=float(arch("rope.freq_base_swa", DEFAULT_LOCAL_THETA)),
        rope_scaling_factor=_gguf_rope_factor(arch),
        query_pre_attn_scalar=float(head_dim),
        final_logit_softcapping=_optional_float(arch("final_logit_softcapping")),
        tie_word_embeddings=not any(t.name == "output.weight"
                                    for t in checkpoint.reader.tensors),
    )
    if arch("attn_logit_softcapping") is not None:
        raise ValueError("attention logit softcapping (Gemma 2) is not supported")
    eot = checkpoint._field("tokenizer.ggml.eot_token_id")
    eos = checkpoint._field("tokenizer.ggml.eos_token_id")
    eos_ids = tuple(int(t) for t in (eos, eot) if t is not None)
    if eos_ids:
        extras["eos_token_ids"] = tuple(dict.fromkeys(eos_ids))
    return extras


def _gguf_pattern(pattern: Any, num_layers: int) -> tuple[bool, ...]:
    """llama.cpp writes the pattern either as a period or as one bool per layer (True = local)."""
    if pattern is None:
        return sliding_layers(num_layers)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != num_layers:
            raise ValueError(f"sliding_window_pattern has {len(pattern)} entries "
                             f"for {num_layers} layers")
        return tuple(bool(p) for p in pattern)
    return sliding_layers(num_layers, int(pattern))


def _gguf_rope_factor(arch: Any) -> float:
    kind = arch("rope.scaling.type")
    factor = arch("rope.scaling.factor")
    if factor is None or kind in (None, "none"):
        return 1.0
    if kind != "linear":
        raise ValueError(f"gemma3 RoPE scaling {kind!r} is not supported (only linear)")
    return float(factor)


def gemma3_extras_from_hf(text: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 fields of ModelConfig from an HF `text_config` dict (old and new key layouts)."""
    num_layers = int(text["num_hidden_layers"])
    activation = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"gemma3 activation {activation!r} is not supported")
    if text.get("attn_logit_softcapping") is not None:
        raise ValueError("attention logit softcapping (Gemma 2) is not supported")

    layer_types = text.get("layer_types")
    if layer_types:
        layer_sliding = tuple(t == "sliding_attention" for t in layer_types)
    else:
        layer_sliding = sliding_layers(
            num_layers, int(text.get("sliding_window_pattern", SLIDING_WINDOW_PATTERN)))

    # New layout: rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}.
    # Old layout: rope_theta, rope_local_base_freq, and rope_scaling for the global layers.
    params = text.get("rope_parameters") or {}
    full = params.get("full_attention") or dict(text.get("rope_scaling") or {})
    local = params.get("sliding_attention") or {}
    global_theta = full.get("rope_theta", text.get("rope_theta", DEFAULT_GLOBAL_THETA))
    local_theta = local.get("rope_theta", text.get("rope_local_base_freq", DEFAULT_LOCAL_THETA))
    if local.get("rope_type", "default") != "default":
        raise ValueError("gemma3: RoPE scaling on local layers is not supported")

    return dict(
        sliding_window=int(text.get("sliding_window") or 4096),
        layer_sliding=layer_sliding,
        rope_theta=float(global_theta),
        rope_local_theta=float(local_theta),
        rope_scaling_factor=_hf_rope_factor(full),
        query_pre_attn_scalar=float(text.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=_optional_float(text.get("final_logit_softcapping")),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
    )


def _hf_rope_factor(full: dict[str, Any]) -> float:
    kind = full.get("rope_type", full.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise ValueError(f"gemma3 RoPE scaling {kind!r} is not supported (only linear)")
    return float(full["factor"])


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
