"""`pagoda capacity`: how many concurrent requests fit in memory, from the model's shape alone.

KV cache bytes per token, per layer:
    num_kv_heads × (key_dim + value_dim) × bytes_per_element
  + num_kv_heads × 2 × scale_bytes        (int8 only: one scale per token, per head, for K and V)
summed over layers. A paged cache hands out blocks of `block_size` tokens, so with M bytes left
after the weights (and the reserve):
    num_blocks   = floor(M / (block_size × kv_bytes_per_token))
    max_requests = floor(num_blocks / ceil(context / block_size))
Every layer is assumed to keep the full context (what a simple paged engine does); for models with
sliding-window layers the count when those layers keep only the window is printed as well.

Weight bytes per precision, in the layouts of `pagoda.quant`: matrices at the precision's width;
int8 adds one fp32 scale per row (per-channel); int4 adds an fp16 scale and an fp16 offset per group
of `int4_group` weights along a row (default 64). 1-D tensors (norms, biases) stay fp32. Every
matrix counts, embeddings included, so this is the footprint of quantizing all of them.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from pagoda.bench.model_shape import ModelShape, read_model_shape

KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 64  # pagoda.quant's default group size
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_memory(text: str, allow_zero: bool = False) -> int:
    """'8GiB', '512 MB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS:
        raise ValueError(f"bad memory size {text!r}; use e.g. 8GiB, 512MB or a byte count")
    value = float(match.group(1)) * UNITS[unit]
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"memory must be positive: {text!r}")
    return int(value)


def kv_bytes_per_token_per_layer(shape: ModelShape, kv_dtype: str, scale_bytes: int = 4) -> int:
    data = shape.num_kv_heads * (shape.head_dim + shape.value_head_dim) * KV_DTYPE_BYTES[kv_dtype]
    scales = shape.num_kv_heads * 2 * scale_bytes if kv_dtype == "int8" else 0
    return data + scales


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str, scale_bytes: int = 4) -> int:
    return shape.num_layers * kv_bytes_per_token_per_layer(shape, kv_dtype, scale_bytes)


def tensor_bytes(dims: tuple[int, ...], dtype: str, int4_group: int = INT4_GROUP) -> int:
    """One tensor's bytes at `dtype` (1-D tensors stay fp32)."""
    n = math.prod(dims)
    if len(dims) < 2:
        return 4 * n
    rows, cols = math.prod(dims[:-1]), dims[-1]
    if dtype == "fp32":
        return 4 * n
    if dtype == "bf16":
        return 2 * n
    if dtype == "int8":
        return n + 4 * rows
    if dtype == "int4":
        return math.ceil(n / 2) + 4 * rows * math.ceil(cols / int4_group)
    raise ValueError(f"unknown weight dtype {dtype!r}")


def weight_bytes(shape: ModelShape, dtype: str, int4_group: int = INT4_GROUP) -> int:
    return sum(tensor_bytes(dims, dtype, int4_group) for dims in shape.weight_shapes)


@dataclass(frozen=True)
class CapacityPlan:
    kv_dtype: str
    kv_bytes_per_token: int
    kv_memory_bytes: int  # memory left for the KV cache
    block_size: int
    num_blocks: int
    blocks_per_request: int
    max_requests: int
    max_requests_sliding: int | None  # when sliding-window layers keep only their window


def plan_capacity(
    shape: ModelShape,
    memory_bytes: int,
    context: int,
    kv_dtype: str,
    weights_dtype: str = "fp32",
    block_size: int = 16,
    scale_bytes: int = 4,
    reserve_bytes: int = 0,
) -> CapacityPlan:
    if context < 1 or block_size < 1 or scale_bytes < 0 or reserve_bytes < 0:
        raise ValueError("context and block size must be positive, scale bytes and reserve >= 0")
    kv_memory = memory_bytes - weight_bytes(shape, weights_dtype) - reserve_bytes
    if kv_memory <= 0:
        raise ValueError(
            f"{weights_dtype} weights (and the reserve) do not fit in the memory given"
        )
    per_token = kv_bytes_per_token(shape, kv_dtype, scale_bytes)
    num_blocks = kv_memory // (block_size * per_token)
    blocks_per_request = math.ceil(context / block_size)
    sliding = None
    if shape.sliding_window and shape.num_sliding_layers:
        per_layer = kv_bytes_per_token_per_layer(shape, kv_dtype, scale_bytes)
        full_layers = shape.num_layers - shape.num_sliding_layers
        kept = min(context, shape.sliding_window)
        per_request = per_layer * (full_layers * context + shape.num_sliding_layers * kept)
        sliding = kv_memory // per_request
    return CapacityPlan(
        kv_dtype=kv_dtype,
        kv_bytes_per_token=per_token,
        kv_memory_bytes=kv_memory,
        block_size=block_size,
        num_blocks=num_blocks,
        blocks_per_request=blocks_per_request,
        max_requests=num_blocks // blocks_per_request,
        max_requests_sliding=sliding,
    )


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_capacity(shape: ModelShape, args: argparse.Namespace, memory: int) -> str:
    s = shape
    lines = [
        f"model: {s.name}  ({s.source})",
        f"  {s.architecture}: {s.num_layers} layers, {s.num_heads} heads,"
        f" {s.num_kv_heads} KV heads, head_dim {s.head_dim}, hidden {s.hidden_size},"
        f" context {s.context_length},"
        f" {s.num_params / 1e6:,.1f} M parameters",
    ]
    if s.sliding_window:
        lines.append(f"  {s.num_sliding_layers} sliding-window layers (window {s.sliding_window})")
    lines.append("weight memory:")
    for dtype in WEIGHT_DTYPES:
        lines.append(
            f"  {dtype:<6}{weight_bytes(s, dtype):>16,} bytes  {_mb(weight_bytes(s, dtype))}"
        )
    lines.append("KV cache bytes per token:")
    dims = f"{s.num_layers} layers × {s.num_kv_heads} KV heads"
    dims += f" × ({s.head_dim} + {s.value_head_dim})"
    for dtype, width in KV_DTYPE_BYTES.items():
        formula = f"{dims} × {width} B"
        if dtype == "int8":
            scales = f"{s.num_layers} × {s.num_kv_heads} × 2 × {args.kv_scale_bytes} B scales"
            formula += f" + {scales}"
        per_token = kv_bytes_per_token(s, dtype, args.kv_scale_bytes)
        lines.append(f"  {dtype:<6}{per_token:>10,}  = {formula}")
    lines.append(
        f"capacity at context {args.context} in {_mb(memory)} ({args.memory}), {args.weights_dtype}"
        f" weights, reserve {args.reserve}, blocks of {args.block_size} tokens:"
    )
    for dtype in kv_dtypes(args):
        try:
            plan = plan_capacity(
                s, memory, args.context, dtype, args.weights_dtype, args.block_size,
                args.kv_scale_bytes, parse_memory(args.reserve, allow_zero=True),
            )  # fmt: skip
        except ValueError as e:
            if not is_split(args):  # one process: nothing else to plan
                raise
            lines.append(f"  kv {dtype:<5} {e} (one process; the split follows)")
            continue
        line = (
            f"  kv {dtype:<5} KV memory {_mb(plan.kv_memory_bytes)}, {plan.num_blocks:,} blocks"
            f" ({plan.num_blocks * plan.block_size:,} tokens) -> max concurrent requests"
            f" {plan.max_requests:,}"
        )
        if plan.max_requests_sliding is not None:
            line += f" ({plan.max_requests_sliding:,} if sliding layers keep only the window)"
        lines.append(line)
    return "\n".join(lines)


def kv_dtypes(args: argparse.Namespace) -> list[str]:
    """The KV dtypes to plan: the one asked for, else every one."""
    return [args.kv_cache_dtype] if args.kv_cache_dtype else list(KV_DTYPE_BYTES)


def is_split(args: argparse.Namespace) -> bool:
    """A TP x PP split was asked for: --memory is then each rank's."""
    return args.tensor_parallel_size > 1 or args.pipeline_parallel_size > 1


def run_capacity(args: argparse.Namespace) -> int:
    memory = parse_memory(args.memory)
    if args.context < 1 or args.block_size < 1 or args.kv_scale_bytes < 0:
        raise ValueError("--context and --block-size must be positive, --kv-scale-bytes >= 0")
    shape = read_model_shape(args.model)
    print(format_capacity(shape, args, memory))
    if is_split(args):
        from pagoda.bench.rank_memory import format_rank_memory

        print(format_rank_memory(
            shape, args.tensor_parallel_size, args.pipeline_parallel_size, args.weights_dtype,
            kv_dtypes(args), memory, args.context, args.block_size, args.kv_scale_bytes,
            parse_memory(args.reserve, allow_zero=True)))  # fmt: skip
    if args.bench:
        print(deployment_report(args))
    elif args.target_rate is not None:
        raise ValueError("--target-rate plans from measured runs: give them with --bench")
    return 0


def deployment_report(args: argparse.Namespace) -> str:
    from pagoda.bench.deployment import format_plan, load_points, plan_layouts
    from pagoda.bench.metrics import parse_slos

    if args.target_rate is None:
        raise ValueError("--bench needs --target-rate (requests/s to serve)")
    if args.cores_per_machine is not None and args.cores_per_machine < 1:
        raise ValueError("--cores-per-machine must be at least 1")
    slos = parse_slos(args.slo)
    points = load_points(args.bench, args.percentile)
    plan, plans = plan_layouts(points, args.target_rate, slos, args.headroom,
                               args.replicas_per_machine, args.cores_per_machine)
    return format_plan(plan, points, slos, args.percentile, plans)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("capacity", help="KV cache size and max concurrency for a model")
    p.add_argument("--model", default=None, help=".gguf file or HF directory (default: SmolLM2)")
    p.add_argument("--memory", default="8GiB", help="memory for weights + KV cache, e.g. 8GiB")
    p.add_argument("--context", type=int, default=4096, help="tokens per request (prompt + output)")
    p.add_argument("--kv-cache-dtype", choices=list(KV_DTYPE_BYTES), default=None)
    p.add_argument("--weights-dtype", choices=WEIGHT_DTYPES, default="fp32")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-scale-bytes", type=int, default=4, help="bytes per int8 KV scale")
    p.add_argument("--reserve", default="0", help="memory held back for activations, e.g. 256MiB")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="also plan each rank's share (weights, KV cache) of a TP x PP split, "
                   "--memory then being each rank's")
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    d = p.add_argument_group("deployment plan (from measured runs of one replica per layout)")
    d.add_argument("--bench", nargs="+", default=None, metavar="RESULT.json",
                   help="`pagoda bench serve`/`sweep` results of one replica at several loads "
                   "(of one or several TP x PP layouts: the cheapest in cores is chosen)")
    d.add_argument("--target-rate", type=float, default=None, help="requests/s to serve")
    d.add_argument("--slo", nargs="+", default=None, metavar="NAME:MS",
                   help="latency limits, e.g. ttft:2000 tpot:100 (ttft, tpot, e2e)")
    d.add_argument("--percentile", choices=["median", "p95", "p99"], default="p99",
                   help="the percentile each SLO applies to")
    d.add_argument("--headroom", type=float, default=0.8,
                   help="plan each replica at this fraction of its measured capacity")
    d.add_argument("--replicas-per-machine", type=int, default=1)
    d.add_argument("--cores-per-machine", type=int, default=None,
                   help="fit replicas on machines by the threads each uses (when recorded) "
                   "instead of --replicas-per-machine")
    p.set_defaults(func=run_capacity)
