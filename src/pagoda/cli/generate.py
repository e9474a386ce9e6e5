"""`pagoda generate "prompt"` and the streaming loop `pagoda chat` shares."""

from __future__ import annotations

import argparse
import sys
import time

from pagoda.cli.engine_args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion, streamed to the terminal")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--stats", action="store_true", help="print tokens/s at the end")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def stream_completion(engine, prompt_ids: list[int], params, out=sys.stdout) -> tuple[str, int]:
    """Run one request on `engine`, writing text as it arrives; returns (text, #tokens)."""
    req_id = engine.new_request_id()
    engine.add_request(req_id, prompt_ids, params)
    text, num_tokens = "", 0
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                for o in output.outputs:
                    out.write(o.text)
                    out.flush()
                    text += o.text
                    num_tokens += len(o.token_ids)
    except KeyboardInterrupt:
        engine.abort_request(req_id)
        out.write("\n[stopped]")
    return text, num_tokens


def run(args: argparse.Namespace) -> int:
    from pagoda.engine.llm_engine import LLMEngine

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    params = sampling_params_from_args(args)
    engine = LLMEngine(engine_config_from_args(args, kv_cache_memory=min(
        args.kv_cache_memory, 256 << 20)))
    tok = engine.tokenizer
    if args.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]),
                         add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
        sys.stdout.write(prompt)
    engine.validate(ids, params)
    start = time.perf_counter()
    _, n = stream_completion(engine, ids, params)
    sys.stdout.write("\n")
    if args.stats:
        dt = time.perf_counter() - start
        print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0
