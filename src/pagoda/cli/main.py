"""`pagoda` command line: a thin dispatcher over subcommands that live beside their stage.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets `func` (a
callable taking the parsed args and returning an exit code). Modules are imported lazily so
`pagoda --help` and light commands stay fast and do not pull in torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that registers it
COMMANDS: dict[str, str] = {
    "generate": "pagoda.cli.generate",
    "chat": "pagoda.cli.chat",
    "serve": "pagoda.server.cli",
    "bench": "pagoda.bench.cli",
    "cost": "pagoda.bench.cost",
    "capacity": "pagoda.bench.capacity",
    "gateway": "pagoda.gateway.cli",
    "ray-serve": "pagoda.cluster.cli",
    "worker": "pagoda.parallel.cli",
    "quantize": "pagoda.quant.cli",
    "eval": "pagoda.quant.eval_cli",
}


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM serving stack")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name)  # placeholder so argparse knows the name
            continue
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("pagoda"):
                sub.add_parser(name, help="(not available in this build)")
            else:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except (CliError, ValueError, OSError) as exc:  # OSError: a path that is a directory,
        # under a file, unreadable...: the reason is the message
        print(f"pagoda {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
