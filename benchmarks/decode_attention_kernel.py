"""The paged decode-attention kernel alone, per ISA flavour and KV dtype, as a decode step reads
it: one call per layer over 30 layers' own caches in turn (so the context is not already in the
core's cache), blocks scattered over the pool. `--baseline REV` also builds the kernel's source
at git revision REV (avx2 flags) and reports every figure as a ratio to it, in the same run.

A shape `pN` is one request's prefill of N tokens as the engine runs it with invariant attention
(quantized models' default): N rows of one request, context lengths 1 .. N.

    python benchmarks/decode_attention_kernel.py [--baseline REV] [--shapes 1x256,32x256,p2048]
                                                 [--kv-dtypes fp32,fp16,bf16]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from pagoda.kernels import build

BINDING = """#include <torch/extension.h>
#include <cstring>
at::Tensor paged_decode(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double,
                        int64_t);
// alloc.h's functions (revisions since it exist allocate through them; bindings.cpp defines them)
namespace pagoda_alloc {
at::Tensor empty(c10::IntArrayRef sizes, const c10::TensorOptions& options) {
  return at::empty(sizes, options);
}
at::Tensor empty_like(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }
at::Tensor copy_of(const void* data, c10::IntArrayRef sizes, c10::ScalarType dtype) {
  at::Tensor out = at::empty(sizes, c10::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), data, out.nbytes());
  return out;
}
}  // namespace pagoda_alloc
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
"""


def baseline_kernel(rev: str):
    """The kernel as it was at `rev`, built with the avx2 flavour's flags."""
    from torch.utils.cpp_extension import load

    folder = Path(tempfile.mkdtemp(prefix="paged_decode_baseline_"))
    for name in ("paged_decode.cpp", "alloc.h"):
        shown = subprocess.run(["git", "show", f"{rev}:src/pagoda/kernels/csrc/{name}"],
                               capture_output=True, text=True)
        if shown.returncode == 0:  # alloc.h only exists since 2026-12-06
            (folder / name).write_text(shown.stdout)
        elif name == "paged_decode.cpp":
            raise SystemExit(f"no paged_decode.cpp at {rev}: {shown.stderr.strip()}")
    (folder / "binding.cpp").write_text(BINDING)
    module = load(f"paged_decode_{rev}", [str(folder / "paged_decode.cpp"),
                                          str(folder / "binding.cpp")],
                  extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", *build.FLAVOURS["avx2"]],
                  build_directory=str(folder), verbose=False)
    return module.paged_decode


def per_layer_us(fn, layers, q, tables, lens, repeats: int = 3) -> float:
    for k, v in layers:  # warm-up
        fn(q, k, v, tables, lens, 0.125, 0)
    start = time.perf_counter()
    for _ in range(repeats):
        for k, v in layers:
            fn(q, k, v, tables, lens, 0.125, 0)
    return 1e6 * (time.perf_counter() - start) / repeats / len(layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="git revision whose kernel is the baseline")
    p.add_argument("--shapes", default="1x256,1x2048,32x256,64x576",
                   help="requests x context length (or pN: a prefill of N), comma-separated")
    p.add_argument("--kv-dtypes", default="fp32,fp16")
    p.add_argument("--layers", type=int, default=30)
    args = p.parse_args()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    flavours = [f for f in build.FLAVOURS if f != "generic" and build.can_run(f)]
    kernels = {f: build.load(f).paged_decode for f in flavours}
    base = baseline_kernel(args.baseline) if args.baseline else None
    block_size, kv_heads, head_dim, heads = 16, 3, 64, 9  # SmolLM2-135M's attention
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        prefill = shape.startswith("p")
        num, context = (int(shape[1:]), int(shape[1:])) if prefill else (
            int(x) for x in shape.split("x"))
        per = -(-context // block_size)
        pool = per * (1 if prefill else num) + 8
        if prefill:  # every row the same request's blocks, one more token each
            tables = torch.randperm(pool)[:per].repeat(num, 1)
            lens = torch.arange(1, num + 1)
        else:
            tables = torch.randperm(pool)[: per * num].view(num, per)
            lens = torch.full((num,), context)
        q = torch.randn(num, heads, head_dim)
        rows = []
        for name in args.kv_dtypes.split(","):
            layers = [tuple(torch.randn(pool, block_size, kv_heads, head_dim).to(dtypes[name])
                            for _ in range(2)) for _ in range(args.layers)]
            if base is not None:
                rows.append((f"{args.baseline}/{name}", per_layer_us(base, layers, q, tables,
                                                                      lens)))
            rows += [(f"{f}/{name}", per_layer_us(kernels[f], layers, q, tables, lens))
                     for f in flavours]
        first = rows[0][1]
        title = f"prefill of {num}" if prefill else f"{num} x {context} tokens"
        print(f"{title}: " + ", ".join(
            f"{label} {us:.0f} us ({first / us:.2f}x)" for label, us in rows), flush=True)


if __name__ == "__main__":
    main()
