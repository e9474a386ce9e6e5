"""`pagoda bench ...`: a dispatcher over benchmark sub-subcommands.

Each module in `BENCH_COMMANDS` exposes `register(bench_subparsers)`, adding its parser with
`set_defaults(func=...)`. A new benchmark (e.g. the offline engine benchmark) plugs in by adding
its module here; a listed module that does not exist yet is skipped, so the list may run ahead of
the code.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_COMMANDS: list[str] = [
    "pagoda.bench.serve",
    "pagoda.bench.sweep",
    "pagoda.bench.plot",
    "pagoda.bench.offline",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: serve, sweep, plot, ...")
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    for module_name in BENCH_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not written yet
            raise
        module.register(bench_sub)

    def no_subcommand(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=no_subcommand)
