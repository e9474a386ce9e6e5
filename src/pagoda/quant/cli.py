"""`pagoda quantize --model M --out DIR`: a quantized checkpoint that loads without re-rounding.

The directory holds model.safetensors + pagoda_quant.json (see `pagoda.quant.checkpoint`) and
the tokenizer files, so `load_quantized_model(DIR)` needs nothing else.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import cache

from pagoda.quant.config import LINEAR_KINDS, METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="write a quantized checkpoint directory")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", "--quantization", dest="method", default="int8",
                   choices=[m for m in METHODS if m != "none"])
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (16..256)")
    p.add_argument("--skip", default="", help=f"comma-separated linear kinds to keep in full "
                   f"precision, from {','.join(LINEAR_KINDS)}")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit activations in fbgemm's int8 kernel (see docs/quantization.md)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading and comparing")
    p.set_defaults(func=run)


@cache
def matmul_gflops(dtype: str, rows: int = 32, k: int = 256, n: int = 512) -> float:
    """A quick measure (milliseconds; cached per process) of this CPU's GEMM speed in `dtype`.
    Constant inputs, so the global RNG (seeded model initialisation) is left alone."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x, w = torch.full((rows, k), 0.5, dtype=dt), torch.full((n, k), 0.25, dtype=dt)
    for _ in range(2):
        torch.nn.functional.linear(x, w)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return 2 * rows * k * n * reps / (time.perf_counter() - start) / 1e9


def half_precision_warning(device: str, dtype: str) -> str | None:
    """The warning CLIs print for bf16/fp16 *activations* on a CPU that multiplies them slowly.

    Whether it does depends on the CPU (AMX or AVX512-BF16 cores run bf16 several times faster
    than fp32; plain AVX2 cores fall to a few GFLOP/s), so it is measured, not assumed."""
    if device != "cpu" or dtype not in ("bf16", "fp16"):
        return None
    half, full = matmul_gflops(dtype), matmul_gflops("fp32")
    if half >= full / 2:
        return None
    return (f"warning: --dtype {dtype} matrix products run at {half:.1f} GFLOP/s on this CPU vs "
            f"{full:.1f} for fp32; use --dtype fp32 (and --quantization int8 for speed)")


def run(args: argparse.Namespace) -> int:
    import torch

    from pagoda.loader.model_loader import load_model, load_quantized_model
    from pagoda.quant.checkpoint import WEIGHTS_FILE, save_quantized
    from pagoda.quant.loading import apply_quantization
    from pagoda.quant.swap import weight_bytes

    start = time.perf_counter()
    loaded = load_model(args.model, progress=False)
    skip = tuple(k for k in args.skip.split(",") if k)
    config = apply_quantization(loaded, args.method, skip=skip, group_size=args.group_size,
                                reduce_range=args.reduce_range)
    save_quantized(loaded.model, args.out, config, loaded.config)
    loaded.tokenizer.hf.save_pretrained(args.out)
    size = os.path.getsize(os.path.join(args.out, WEIGHTS_FILE))
    linear = weight_bytes(loaded.model)
    print(f"quantized {loaded.path} with {args.method} in {time.perf_counter() - start:.1f} s: "
          f"{args.out}/{WEIGHTS_FILE} {size / 1e6:.1f} MB (linear weights stored "
          f"{linear['quantized_stored'] / 1e6:.1f} MB, "
          f"dense {linear['dense_linear'] / 1e6:.1f} MB)")
    if args.method == "bf16":
        print("note: bf16 weights have no fast CPU kernel here; they are widened to fp32 per call")
    if args.no_verify:
        return 0
    reloaded = load_quantized_model(args.out)
    from pagoda.quant.quality import prefill_logits

    ids = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    same = torch.equal(prefill_logits(loaded.model, loaded.config, ids),
                       prefill_logits(reloaded.model, reloaded.config, ids))
    print(f"reloaded in {reloaded.load_seconds:.2f} s; logits identical to the quantized "
          f"model: {same}")
    return 0 if same else 1
