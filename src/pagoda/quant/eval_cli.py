"""`pagoda eval quality --model M`: one table row per precision, measured in one process.

Columns: weight memory (all parameters and buffers, plus packed kernel copies), load time (GGUF
load + quantization, and reload of the saved quantized checkpoint), perplexity on the shipped
English text, teacher-forced greedy agreement with fp32 over fixed prompts, identical greedy
continuations, batch-1 decode tok/s and 32-concurrent output tok/s through the real engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass

from pagoda.quant.config import METHODS


@dataclass
class QualityRow:
    precision: str
    weight_mb: float
    load_s: float
    reload_s: float | None
    perplexity: float
    agreement: float
    identical: str
    decode_tok_s: float
    batch_tok_s: float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="quality/speed evaluations")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    q = sub.add_parser("quality", help="perplexity, agreement and speed per precision")
    q.add_argument("--model", default=None)
    q.add_argument("--precisions", default="none,int8,int4,gguf,fp16",
                   help=f"comma-separated, from {','.join(METHODS)}; 'none' (fp32) always runs")
    q.add_argument("--ppl-tokens", type=int, default=20480)
    q.add_argument("--window", type=int, default=1024, help="perplexity window (tokens)")
    q.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    q.add_argument("--concurrency", type=int, default=32)
    q.add_argument("--decode-tokens", type=int, default=64)
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    q.add_argument("--out", default="eval_quality.md", help="markdown table (+ .json beside it)")
    q.set_defaults(func=run)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    import torch

    from pagoda.quant.quality import PROMPTS, load_eval_text

    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ["none"] + [p for p in args.precisions.split(",") if p and p != "none"]
    unknown = [p for p in precisions if p not in METHODS]
    if unknown:
        raise ValueError(f"unknown precisions {unknown}")
    rows: list[QualityRow] = []
    reference: list[tuple[int, list[int]]] = []
    text_ids: list[int] = []
    for precision in precisions:
        row, loaded, outputs = _measure(precision, args, text_ids, reference)
        if precision == "none":
            tok = loaded.tokenizer
            prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
            reference[:] = [(len(p), p + o) for p, o in zip(prompts, outputs, strict=True)]
            text_ids[:] = tok.encode(load_eval_text(), add_special_tokens=False)
            row = _measure(precision, args, text_ids, reference, loaded)[0]
        rows.append(row)
        print(_format_row(row), flush=True)
    table = _table(rows, args)
    print(table)
    with open(args.out, "w") as f:
        f.write(table + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


def _measure(precision: str, args: argparse.Namespace, text_ids: list[int],
             reference: list[tuple[int, list[int]]], loaded=None):  # noqa: ANN001, ANN202
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.loader.model_loader import load_model, load_quantized_model
    from pagoda.quant.checkpoint import save_quantized
    from pagoda.quant.loading import apply_quantization
    from pagoda.quant.quality import (
        PROMPTS,
        perplexity,
        run_engine,
        teacher_forced_agreement,
    )
    from pagoda.quant.swap import all_parameter_bytes, weight_bytes

    reload_s = None
    start = time.perf_counter()
    if loaded is None:
        loaded = load_model(args.model, progress=False)
        config = None
        if precision != "none":
            config = apply_quantization(loaded, precision)
        load_s = time.perf_counter() - start
        if config is not None:  # the path a served model takes: reload the saved checkpoint
            with tempfile.TemporaryDirectory() as tmp:
                save_quantized(loaded.model, tmp, config, loaded.config)
                loaded.tokenizer.hf.save_pretrained(tmp)
                loaded = load_quantized_model(tmp)
                reload_s = loaded.load_seconds
                loaded.tokenizer.hf  # noqa: B018 - built on first use: read it before tmp goes
        loaded.load_s = load_s  # remembered for the second pass over the fp32 model
    load_s = loaded.load_s
    memory = all_parameter_bytes(loaded.model) + weight_bytes(loaded.model)["quantized_packed"]
    engine = LLMEngine(EngineConfig(model=args.model, progress=False,
                                    max_num_seqs=max(args.concurrency, len(PROMPTS))),
                       loaded=loaded)
    greedy = run_engine(engine, list(PROMPTS), args.gen_tokens)
    if not reference or not text_ids:  # first pass over fp32: only the reference outputs
        return None, loaded, greedy.token_ids
    identical = sum(ref[n:] == out for (n, ref), out in zip(reference, greedy.token_ids,
                                                             strict=True))
    ppl = perplexity(loaded.model, loaded.config, text_ids[:args.ppl_tokens], args.window)
    agreement = teacher_forced_agreement(loaded.model, loaded.config, reference)
    single = run_engine(engine, [PROMPTS[1]], args.decode_tokens)
    batch = run_engine(engine, [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)],
                       args.decode_tokens)
    row = QualityRow(precision if precision != "none" else "fp32", memory / 1e6, load_s,
                     reload_s, ppl, agreement, f"{identical}/{len(reference)}",
                     single.decode_tok_per_s, batch.output_tok_per_s)
    return row, loaded, greedy.token_ids


def _format_row(r: QualityRow) -> str:
    reload = "-" if r.reload_s is None else f"{r.reload_s:.1f}"
    return (f"| {r.precision} | {r.weight_mb:.0f} | {r.load_s:.1f} | {reload} | "
            f"{r.perplexity:.3f} | {100 * r.agreement:.1f}% | {r.identical} | "
            f"{r.decode_tok_s:.1f} | {r.batch_tok_s:.1f} |")


def _table(rows: list[QualityRow], args: argparse.Namespace) -> str:
    import torch

    head = (f"pagoda eval quality ({time.strftime('%Y-%m-%d %H:%M')}, torch threads "
            f"{torch.get_num_threads()}; perplexity over {args.ppl_tokens} tokens in windows of "
            f"{args.window}; agreement: teacher-forced greedy tokens vs fp32 over "
            f"{args.gen_tokens} tokens x 8 prompts)\n\n"
            "| precision | weight MB | load s | reload s | perplexity | agreement | "
            "identical greedy | batch-1 decode tok/s | "
            f"{args.concurrency}-concurrent output tok/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    return "\n".join([head] + [_format_row(r) for r in rows])
