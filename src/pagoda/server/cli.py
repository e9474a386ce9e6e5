"""`pagoda serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

The engine loop runs in a spawned engine process by default, or in a background thread of this
process with `--engine-thread`; docs/server.md and docs/benchmarks.md compare the two. The engine
flags are the ones every engine command shares (`pagoda.cli.engine_args`).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from pagoda.cli.engine_args import add_engine_args, engine_config_from_args
from pagoda.server.config import MAX_BODY_BYTES

log = logging.getLogger("pagoda.server")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_args(p)
    p.set_defaults(func=run)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The HTTP and engine flags of `pagoda serve` (also `pagoda ray-serve`'s)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY") or None,
                   help="require 'Authorization: Bearer <key>' (default: $PAGODA_API_KEY, which "
                   "keeps the key out of the process list)")
    p.add_argument("--served-model-name", default=None, help="model id reported by the API")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="admitted requests without a first token beyond which new ones get 503")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    # The default since 2026-12-03: the engine steps on its process's main thread, where the C++
    # kernels' OpenMP regions are cheap; from a server thread they cost ~120 us more each, which
    # made batch-1 decode 3x slower (docs/benchmarks.md, "batch-1 through the server").
    p.add_argument("--engine-process", dest="engine_process", action="store_true", default=True,
                   help="run the engine loop in a spawned engine process (the default)")
    p.add_argument("--engine-thread", dest="engine_process", action="store_false",
                   help="run the engine loop in a thread of the server process instead "
                   "(~300 MB less memory, one process; slower batch-1 decode with 2+ threads)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="export OpenTelemetry traces over OTLP/HTTP to this collector URL "
                   "(e.g. http://127.0.0.1:4318/v1/traces); docs/server.md")
    cors = p.add_argument_group("CORS (vLLM's flags; each list as values or a JSON list)")
    cors.add_argument("--allowed-origins", nargs="*", type=str, default=["*"], metavar="ORIGIN",
                      help="origins whose web pages may call the API ('*': any; none: CORS off)")
    cors.add_argument("--allowed-methods", nargs="+", type=str, default=["*"], metavar="METHOD")
    cors.add_argument("--allowed-headers", nargs="+", type=str, default=["*"], metavar="HEADER")
    cors.add_argument("--allow-credentials", action="store_true",
                      help="let browsers send cookies and HTTP auth cross-origin")
    add_engine_args(p)


def string_list(values: list[str], flag: str) -> tuple[str, ...]:
    """`a b`, `a,b` or vLLM's JSON `["a", "b"]` -> ("a", "b"); anything else is a usage error."""
    import json

    out: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                items = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{flag}: not a JSON list of strings: {value!r}") from exc
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"{flag}: not a JSON list of strings: {value!r}")
            out.extend(items)
        else:
            out.extend(v.strip() for v in value.split(",") if v.strip())
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> Any:
    from pagoda.server.config import ServerConfig

    # no tqdm bar in server logs; loading is reported by log lines
    engine = engine_config_from_args(args, progress=False)
    return ServerConfig(
        engine=engine, host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, max_waiting=args.max_waiting,
        request_timeout=args.request_timeout, shutdown_grace=args.shutdown_grace,
        max_body_bytes=args.max_body_bytes, engine_process=args.engine_process,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        allowed_origins=string_list(args.allowed_origins, "--allowed-origins"),
        allowed_methods=string_list(args.allowed_methods, "--allowed-methods"),
        allowed_headers=string_list(args.allowed_headers, "--allowed-headers"),
        allow_credentials=args.allow_credentials)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pagoda import log_redaction
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
    log_redaction.install()  # after uvicorn.Config, which applies uvicorn's logging config
    server = DrainingServer(uv_config, app.state.client)
    server.run()
    return 1 if app.state.client.failed else 0
