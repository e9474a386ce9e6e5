"""`pagoda gateway --config gateway.yaml [--host H] [--port P] [--redis URL]` runs the gateway;
`pagoda gateway hash-key [KEY]` prints the salted hash to put in the config's `keys[].hash`
(reads the key from stdin when not given, so it need not appear in shell history)."""

from __future__ import annotations

import argparse
import getpass
import sys


def _hash_key(args: argparse.Namespace) -> int:
    from pagoda.gateway.auth import hash_key

    key = args.key
    if key is None:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise ValueError("empty API key")
    print(hash_key(key, iterations=args.iterations))
    return 0


def _generate_key(args: argparse.Namespace) -> int:
    import secrets

    from pagoda.gateway.auth import hash_key

    key = "pk-" + secrets.token_urlsafe(32)
    print(f"key:  {key}")
    print(f"hash: {hash_key(key)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if not args.config:
        raise ValueError("--config is required (see docs/gateway.md)")
    import uvicorn

    from pagoda import log_redaction
    from pagoda.gateway.app import create_app
    from pagoda.gateway.config import load_config

    config = load_config(args.config)
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    if not 1 <= port <= 65535:  # uvicorn would listen on port % 65536 and log the given one
        raise ValueError("--port must be in 1..65535")
    redis_url = args.redis or config.redis_url
    if redis_url:
        _check_redis(redis_url)
    app = create_app(config, redis_url=args.redis,
                     otlp_traces_endpoint=args.otlp_traces_endpoint)
    pools = ", ".join(f"{p.name} ({len(p.upstreams)} upstreams, {p.policy})" for p in config.models)
    state = "redis" if (args.redis or config.redis_url) else "in-memory"
    print(f"pagoda gateway: {len(config.keys)} keys; models: {pools}; {state} limits and cache; "
          f"http://{host}:{port}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                                           access_log=args.log_level == "debug"))
    log_redaction.install()  # after uvicorn.Config, which applies uvicorn's logging config
    server.run()
    return 0


def _check_redis(url: str) -> None:
    """One line, before uvicorn starts, when the shared state is unreachable (the app's own
    ping at start-up would end in uvicorn's traceback)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        client.ping()
        client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise ValueError(f"cannot reach Redis at {url}: {exc}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="API gateway in front of pagoda serve replicas",
        description="OpenAI-compatible gateway: API keys, rate limits, routing, response cache.",
    )
    parser.add_argument("--config", help="gateway YAML config (see docs/gateway.md)")
    parser.add_argument("--host", default=None, help="listen address (default: config's host)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default: config's)")
    parser.add_argument(
        "--redis", default=None, metavar="URL",
        help="redis://... to share limits and cache between gateway instances",
    )
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                        help="export OpenTelemetry traces over OTLP/HTTP to this collector "
                        "(overrides the config's otlp_traces_endpoint)")
    parser.set_defaults(func=_serve)
    actions = parser.add_subparsers(dest="gateway_action", metavar="ACTION")
    hasher = actions.add_parser("hash-key", help="print the config hash of an API key")
    hasher.add_argument("key", nargs="?", help="the key (default: read from stdin)")
    hasher.add_argument("--iterations", type=int, default=100_000, help="PBKDF2 iterations")
    hasher.set_defaults(func=_hash_key)
    generator = actions.add_parser("new-key", help="generate a random API key and its hash")
    generator.set_defaults(func=_generate_key)
