"""What to quantize and how: `QuantConfig`, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

# The projection kinds of the model contract (a linear's kind is the last part of its module name).
LINEAR_KINDS: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")

# none: leave nn.Linear alone.  int8: per-output-channel symmetric int8.  int4: group-wise
# asymmetric 4-bit (scale and offset per group).  gguf: the GGUF file's own blocks.
# fp16 / bf16: half-precision weights, any activation dtype.
METHODS: tuple[str, ...] = ("none", "int8", "int4", "gguf", "fp16", "bf16")

# Kernels for the forward pass (`kernel_plan.py` holds the table). "auto": Pagoda's own igemm
# (4-bit weights, int8 activations per 32-block) or wgemm (weights widened to fp32) in the best
# ISA flavour this CPU runs, batch-invariant at every row count; "qgemm" the int8-activation GEMV;
# "<kernel>-<flavour>" forces one flavour; "onednn" /
# "fbgemm" ask for those int8 libraries (falling back when the CPU lacks them; their rounding
# depends on the batch); "reference" forces the portable dequantize + matmul path that every
# device runs.
BACKENDS: tuple[str, ...] = ("auto", "qgemm", "qgemm-generic", "qgemm-avx2", "qgemm-avx512",
                             "wgemm", "wgemm-generic", "wgemm-avx2", "wgemm-avx512",
                             "igemm", "igemm-generic", "igemm-avx2", "igemm-avx512",
                             "onednn", "fbgemm", "reference")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "int8"
    # Linear kinds left in full precision, e.g. ("lm_head",).
    skip: tuple[str, ...] = ()
    # int4 only: weights per (scale, offset) group along the input dimension.
    group_size: int = 32  # 32 reproduces a Q4_1 (group 32) source exactly; see docs
    # gguf only: the file whose blocks become the weights (the model's own weights are ignored).
    gguf_path: str | None = None
    # fbgemm's dynamic int8 linear multiplies uint8 activations by int8 weights in pairs that
    # accumulate in int16 (vpmaddubsw) and can saturate; reduce_range quantizes activations to
    # 7 bits so that cannot happen, at the cost of doubling the activation rounding error.
    # docs/quantization.md has the measurement behind the default.
    reduce_range: bool = False
    # fbgemm path: input columns larger than this multiple of the median column are multiplied
    # exactly in fp32 (quant_linear.py explains why); 0 disables.
    outlier_ratio: float = 5.0
    backend: str = "auto"
    kinds: tuple[str, ...] = field(default=LINEAR_KINDS)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization method {self.method!r} not in {METHODS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} not in {BACKENDS}")
        unknown = [k for k in self.skip if k not in self.kinds]
        if unknown:
            raise ValueError(f"skip names unknown linear kinds {unknown}; kinds are {self.kinds}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"group_size must be 16, 32, 64, 128 or 256, not {self.group_size}")
        if self.method == "gguf" and not self.gguf_path:
            raise ValueError("method 'gguf' needs gguf_path")

    def wants(self, kind: str) -> bool:
        """Whether a linear of this kind is swapped."""
        return self.method != "none" and kind in self.kinds and kind not in self.skip
