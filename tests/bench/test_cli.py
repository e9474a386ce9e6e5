"""`pagoda bench` dispatch: sub-subcommands come from a list of modules, so others can plug in."""

from __future__ import annotations

import sys
import types

from pagoda.bench import cli as bench_cli
from pagoda.cli.main import main


def test_a_listed_module_registers_a_bench_subcommand(monkeypatch, capsys):
    extra = types.ModuleType("pagoda.bench.extra_for_test")

    def register(bench_sub) -> None:
        parser = bench_sub.add_parser("extra")
        parser.add_argument("--n", type=int, default=1)
        parser.set_defaults(func=lambda args: print(f"extra ran n={args.n}") or 0)

    extra.register = register
    monkeypatch.setitem(sys.modules, "pagoda.bench.extra_for_test", extra)
    monkeypatch.setattr(bench_cli, "BENCH_COMMANDS", [*bench_cli.BENCH_COMMANDS, extra.__name__])
    assert main(["bench", "extra", "--n", "3"]) == 0
    assert "extra ran n=3" in capsys.readouterr().out


def test_missing_modules_are_skipped_and_bare_bench_prints_help(monkeypatch, capsys):
    monkeypatch.setattr(
        bench_cli, "BENCH_COMMANDS", [*bench_cli.BENCH_COMMANDS, "pagoda.bench.not_written_yet"]
    )
    assert main(["bench"]) == 2
    out = capsys.readouterr().out
    assert "serve" in out and "sweep" in out and "plot" in out
