"""Engine flags shared by every command that builds an engine (generate, chat, serve, bench)."""

from __future__ import annotations

import argparse
import re

from pagoda.engine.config import (
    ATTENTION_BACKENDS,
    QUANT_KERNELS,
    SPECULATIVE_METHODS,
    EngineConfig,
)
from pagoda.layers.pooler import POOLING_MODES
from pagoda.loader.model_loader import resolve_model_path
from pagoda.models.bert import ATTENTION_MODES

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'1GiB', '512M', '134217728' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags; defaults are EngineConfig's own, so the two cannot disagree."""
    d = EngineConfig()
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=d.model,
                   help="GGUF file or HF model directory; unset: SmolLM2-135M-Instruct")
    g.add_argument("--device", default=d.device)
    g.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"])
    g.add_argument("--quantization", default=d.quantization,
                   choices=["auto", "none", "int8", "int4", "gguf"],
                   help="weights: auto (a GGUF file's own blocks on the CPU in fp32, else none), "
                   "none (fp32: the transformers-identical reference), int8, int4, gguf")
    g.add_argument("--quant-kernel", default=d.quant_kernel, choices=list(QUANT_KERNELS),
                   help="kernel of quantized linears: auto (igemm for 4/8-bit groups of 32k: int8 "
                   "activations per 32-block, an integer GEMM; wgemm for the others: weights "
                   "widened to fp32; the best ISA flavour this CPU runs; batch-invariant), "
                   "qgemm (int8-activation GEMV), one flavour of these, the oneDNN (AMX) or "
                   "fbgemm int8 libraries, or the portable dequantize + matmul")
    g.add_argument("--dense-kernel", default=d.dense_kernel,
                   choices=["auto", "fgemm", "onednn", "torch"],
                   help="kernel of fp32 linears: fgemm (pagoda's batch-invariant kernel; auto "
                   "where the C++ kernels build), oneDNN on reordered weights, or torch's (MKL)")
    g.add_argument("--no-huge-pages", action="store_true",
                   help="keep the linears' weights in 4 KiB pages (by default they move into "
                   "2 MiB transparent huge pages at load: fewer TLB misses per decode step)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=d.kv_cache_memory,
                   help="bytes for the KV block pool (e.g. 512MiB, 1GiB)")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype,
                   choices=["auto", "fp32", "fp16", "bf16", "int8"],
                   help="auto: bf16 for quantized linears (the GGUF default), else the compute "
                   "dtype")
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-model-len", type=int, default=d.max_model_len)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--batching", default=d.batching, choices=["continuous", "static"])
    g.add_argument("--attention-backend", default=d.attention_backend,
                   choices=list(ATTENTION_BACKENDS),
                   help="decode attention: gather + SDPA (torch), paged kernels reading the "
                   "cache in place (cpp, numba; CPU), or auto (cpp when it builds)")
    g.add_argument("--invariant-attention", default="auto", choices=["auto", "on", "off"],
                   help="prefill queries through the decode kernel so a token's attention does "
                   "not depend on its batch or on prefix-cache hits (auto: on when quantized)")
    g.add_argument("--fused-ops", default="auto", choices=["auto", "on", "off"],
                   help="RMSNorm, RoPE + KV write and SiLU * up as single C++ calls, a decode "
                   "step's layers as one call (CPU; auto: on)")
    s = p.add_argument_group("speculative decoding (docs/spec_decode.md)")
    s.add_argument("--speculative-method", default=None, choices=list(SPECULATIVE_METHODS),
                   help="draft tokens by prompt lookup (ngram), from a draft model, or by "
                   "lookup where the context repeats a 3-token run and the draft model "
                   "elsewhere (hybrid: the fastest measured for one user), verified by the "
                   "model in one pass; the output distribution is unchanged")
    s.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts per step (default: the measured best of the method; hybrid's "
                   "draft model drafts at most 4 of them)")
    s.add_argument("--prompt-lookup-min", type=int, default=d.prompt_lookup_min,
                   help="smallest n-gram looked up (default: 1 on fp32 weights, 2 on quantized, 3 "
                   "for hybrid)")
    s.add_argument("--prompt-lookup-max", type=int, default=d.prompt_lookup_max)
    s.add_argument("--draft-model", default=None,
                   help="'self' (default: a low-bit copy of the model) or a model path with "
                   "the same vocabulary")
    s.add_argument("--draft-quantization", default=d.draft_quantization,
                   choices=["auto", "none", "int8", "int4", "gguf"],
                   help="weights of the draft (auto: the GGUF file's own blocks, else int4)")
    s.add_argument("--speculative-max-batch", type=int, default=d.speculative_max_batch,
                   help="speculate only while at most this many requests run (default: "
                   "measured per method, ngram and hybrid 8, draft 4)")
    t = p.add_argument_group("parallelism (docs/parallel.md)")
    t.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                   help="split each layer's heads and MLP over this many processes (gloo on "
                   "CPU); --threads is divided between them")
    t.add_argument("--pipeline-parallel-size", "-pp", type=int,
                   default=d.pipeline_parallel_size,
                   help="cut the layers into this many stages, one process each (a batch in "
                   "flight per stage keeps them busy); --threads is divided between them")
    t.add_argument("--nnodes", type=int, default=d.nnodes,
                   help="machines the ranks run on; the others run `pagoda worker` "
                   "(docs/parallel.md; needs PAGODA_DIST_KEY on every node)")
    t.add_argument("--distributed-executor", default=d.distributed_executor,
                   choices=["mp", "ray"],
                   help="who starts the other ranks: mp (this process, and `pagoda worker` on "
                   "other nodes) or ray (a placement group on the Ray cluster of RAY_ADDRESS)")
    t.add_argument("--master-addr", default=d.master_addr,
                   help="this machine's address as the other nodes reach it")
    t.add_argument("--master-port", type=int, default=d.master_port,
                   help="rendezvous port on this machine (the next port takes the workers' "
                   "connections)")
    e = p.add_argument_group("embeddings (docs/embeddings.md)")
    e.add_argument("--task", default=d.task, choices=["auto", "generate", "embed"],
                   help="embed: serve /v1/embeddings (auto: embed for encoder models such as "
                   "all-MiniLM-L6-v2, generate otherwise)")
    e.add_argument("--pooling", default=d.pooling, choices=list(POOLING_MODES),
                   help="override the model's pooling (default: the sentence-transformers "
                   "config; lasttoken for decoders)")
    e.add_argument("--embed-attention", default=d.embed_attention, choices=list(ATTENTION_MODES),
                   help="encoder attention over a packed batch: one padded call or one call "
                   "per sequence")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--threads", "--num-threads", dest="threads", type=int, default=d.num_threads,
                   help="torch CPU threads")


def engine_config_from_args(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    values = dict(
        model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
        quant_kernel=args.quant_kernel, dense_kernel=args.dense_kernel,
        huge_pages=not args.no_huge_pages,
        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching, batching=args.batching,
        attention_backend=args.attention_backend,
        invariant_attention={"auto": None, "on": True, "off": False}[args.invariant_attention],
        fused_ops={"auto": None, "on": True, "off": False}[args.fused_ops],
        speculative_method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens,
        prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max,
        draft_model=(args.draft_model or "self") if args.speculative_method in ("draft", "hybrid")
        else args.draft_model,
        draft_quantization=args.draft_quantization,
        speculative_max_batch=args.speculative_max_batch,
        task=args.task, pooling=args.pooling, embed_attention=args.embed_attention,
        seed=args.seed, num_threads=args.threads,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        nnodes=args.nnodes, master_addr=args.master_addr, master_port=args.master_port,
        distributed_executor=args.distributed_executor,
    )
    values.update(overrides)
    config = EngineConfig(**values)
    # a missing model or draft file is a one-line error now, not a traceback from the engine's
    # loader after the server has started
    resolve_model_path(config.model)
    if config.draft_model not in (None, "self"):
        resolve_model_path(config.draft_model)
    return config


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=[])


def sampling_params_from_args(args: argparse.Namespace):
    from pagoda.sampling.params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed, stop=args.stop)
