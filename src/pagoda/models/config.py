"""Architecture-level description of a model, independent of where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "gemma3"
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 specifics (ignored by Llama): per-layer sliding windows (None = global attention).
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = field(default=())
    rope_local_theta: float | None = None
    rope_scaling_factor: float = 1.0  # linear scaling of global-layer positions
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs heads divisible by kv heads"
        assert not self.layer_sliding or len(self.layer_sliding) == self.num_layers

    def window_of(self, layer: int) -> int | None:
        """Sliding-window length of `layer`, or None for full attention."""
        if self.layer_sliding and self.layer_sliding[layer]:
            return self.sliding_window
        return None

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * bytes_per_element
