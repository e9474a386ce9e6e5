"""`pagoda chat`: an interactive conversation in the terminal, replies streamed as they arrive.

Commands: /reset clears the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import sys

from pagoda.cli.engine_args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)
from pagoda.cli.generate import stream_completion


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pagoda.engine.llm_engine import LLMEngine, RequestError
    from pagoda.loader.tokenizer import TextError, check_unicode

    params = sampling_params_from_args(args)
    engine = LLMEngine(engine_config_from_args(args, kv_cache_memory=min(
        args.kv_cache_memory, 256 << 20)))
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    print("Chat with the model. /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(system)
            print("[conversation cleared]", file=sys.stderr)
            continue
        try:  # stdin decodes undecodable bytes to lone surrogates
            check_unicode(line)
        except TextError:
            print("error: that line is not valid UTF-8; it was skipped", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        try:
            engine.validate(ids, params)
        except RequestError as exc:
            print(f"error: {exc} (use /reset)", file=sys.stderr)
            messages.pop()
            continue
        reply, _ = stream_completion(engine, ids, params)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
