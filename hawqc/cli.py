"""The ``hawqc`` command.

Each subcommand is a public module of :mod:`hawqc.commands` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; adding a module adds a subcommand.
Command modules import torch and tvm inside ``run`` so that ``hawqc --help`` stays fast.
User errors (``ValueError``, ``OSError``) end in one line on stderr and exit status 1; Ctrl-C ends
in "interrupted" and exit status 130 (:mod:`hawqc.interrupts`).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

import hawqc
import hawqc.commands
from hawqc import interrupts


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hawqc",
        description="HAWQ-V3 integer-only quantization: quantize, compile with TVM, tune, choose bits.",
    )
    parser.add_argument("--version", action="version", version=f"hawqc {hawqc.__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(hawqc.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # shared helpers, not commands
            continue
        module = importlib.import_module(f"hawqc.commands.{info.name}")
        name = info.name.replace("_", "-")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    interrupted = f"hawqc {args.command}: interrupted"
    try:
        with interrupts.handling(interrupted):
            return args.run(args)
    except BaseException as err:
        if interrupts.requested():  # whatever the Ctrl-C became on its way out of TVM
            interrupts.exit_now(interrupted)
        if isinstance(err, KeyboardInterrupt):
            print(interrupted, file=sys.stderr)
            return interrupts.EXIT_STATUS
        if isinstance(err, (ValueError, OSError)):
            print(f"hawqc {args.command}: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
