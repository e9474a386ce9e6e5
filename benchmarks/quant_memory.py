"""Weight memory and checkpoint load time per precision for the default model.

For each method: load the GGUF model in fp32, quantize, save a checkpoint, reload it with
`load_quantized_model` (which packs the kernels), and report resident weight bytes (parameters,
buffers and packed kernel copies), checkpoint size and reload time.

    nice -n 10 .venv/bin/python benchmarks/quant_memory.py --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import torch

from pagoda.loader.model_loader import load_model, load_quantized_model
from pagoda.quant.checkpoint import WEIGHTS_FILE, save_quantized
from pagoda.quant.loading import apply_quantization
from pagoda.quant.swap import all_parameter_bytes, weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="none,int8,int4,gguf,fp16,bf16")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# quant_memory {datetime.datetime.now().isoformat(timespec='minutes')}")
    print("| precision | resident weights MB | of which linear stored / packed MB | "
          "checkpoint MB | quantize s | reload s |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        start = time.perf_counter()
        loaded = load_model(args.model, progress=False)
        load_s = time.perf_counter() - start
        if method == "none":
            mb = all_parameter_bytes(loaded.model) / 1e6
            print(f"| fp32 | {mb:.0f} | - | (GGUF) | - | {load_s:.1f} (GGUF load) |", flush=True)
            continue
        start = time.perf_counter()
        config = apply_quantization(loaded, method)
        quant_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(loaded.model, tmp, config, loaded.config)
            loaded.tokenizer.hf.save_pretrained(tmp)
            size = os.path.getsize(os.path.join(tmp, WEIGHTS_FILE)) / 1e6
            reloaded = load_quantized_model(tmp)
        lin = weight_bytes(reloaded.model)
        total = (all_parameter_bytes(reloaded.model) + lin["quantized_packed"]) / 1e6
        print(f"| {method} | {total:.0f} | {lin['quantized_stored'] / 1e6:.0f} / "
              f"{lin['quantized_packed'] / 1e6:.0f} | {size:.0f} | {quant_s:.1f} | "
              f"{reloaded.load_seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
