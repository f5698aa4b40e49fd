"""Command line: `nanot5 <command> [key=value ...]`.

Each command lives in the module that owns its work; this file only dispatches, so
`nanot5 --help` stays fast (no torch import until a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from nanot5 import __version__

    parser = argparse.ArgumentParser(
        prog="nanot5",
        description="Pre-train and fine-tune T5 encoder-decoders. "
        "Options are key=value overrides, e.g. `nanot5 pretrain optim.base_lr=1e-2`.",
    )
    parser.add_argument("--version", action="version", version=f"nanot5 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv:
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 2
    target, _ = COMMANDS[args.command]
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
