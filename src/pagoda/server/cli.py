"""`pagoda serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

The engine steps in a background thread of this process (see `AsyncLLM`), not in a separate
process: on a 2-core CPU box the model's matmuls dominate and release the GIL, so a process hop
would only add serialization per token (docs/server.md).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

MAX_BODY_BYTES = 4 << 20  # keep in step with pagoda.server.config (not imported: it pulls torch)

log = logging.getLogger("pagoda.server")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file, HF directory or known name "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>'")
    p.add_argument("--served-model-name", default=None, help="model id reported by the API")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="admitted requests without a first token beyond which new ones get 503")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine (unset options keep EngineConfig's defaults)")
    e.add_argument("--kv-cache-memory", type=int, help="bytes for the KV block pool")
    e.add_argument("--kv-cache-dtype")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--quantization")
    e.add_argument("--block-size", type=int)
    e.add_argument("--max-num-batched-tokens", type=int)
    e.add_argument("--max-num-seqs", type=int)
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   default=None)
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=None)
    e.add_argument("--batching")
    e.add_argument("--attention-backend", choices=["torch", "numba"])
    e.add_argument("--seed", type=int)
    e.add_argument("--num-threads", type=int)
    p.set_defaults(func=run)


ENGINE_OPTIONS = ("model", "dtype", "quantization", "kv_cache_memory", "kv_cache_dtype",
                  "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
                  "enable_chunked_prefill", "enable_prefix_caching", "batching", "seed",
                  "num_threads", "attention_backend")


def config_from_args(args: argparse.Namespace) -> Any:
    from pagoda.engine.config import EngineConfig
    from pagoda.server.config import ServerConfig

    chosen = {k: getattr(args, k) for k in ENGINE_OPTIONS if getattr(args, k) is not None}
    engine = EngineConfig(progress=False, **chosen)
    return ServerConfig(
        engine=engine, host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, max_waiting=args.max_waiting,
        request_timeout=args.request_timeout, shutdown_grace=args.shutdown_grace,
        max_body_bytes=args.max_body_bytes)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pagoda.server.app import build_app
    from pagoda.server.uvicorn_server import DrainingServer

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    server: DrainingServer | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(config, on_fatal=fatal)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=args.log_level,
        timeout_graceful_shutdown=config.shutdown_grace, ws_max_size=config.max_body_bytes,
        access_log=args.log_level == "debug")
    server = DrainingServer(uv_config, app.state.client)
    server.run()
    return 1 if app.state.client.status == "failed" else 0
