"""Command line: `nanot5 <command> [key=value ...]`.

Each command lives in the module that owns its work; this file only dispatches, so
`nanot5 --help` stays fast (no torch import until a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("nanot5.train:pretrain_main", "pre-train with span corruption (default preset: demo)"),
    "finetune": ("nanot5.train:finetune_main", "fine-tune on Super-Natural Instructions (preset: sni)"),
    "evaluate": ("nanot5.evaluate:evaluate_main", "held-out loss/accuracy of a model directory"),
    "predict": ("nanot5.evaluate:predict_main", "generate for SNI test tasks; exact match and ROUGE-L"),
    "export": ("nanot5.evaluate:export_main", "write a checkpoint in Hugging Face format"),
    "plan": ("nanot5.plan:plan_main", "memory per device of a training config (parameters ... activations)"),
    "tokenizer": ("nanot5.data.tokenizer:tokenizer_main", "train a SentencePiece tokenizer (tokenizer train ...)"),
    "data": ("nanot5.cli:data_main", "prepare data sets (data prepare demo|sni ...)"),
}


def data_main(argv: list[str]) -> int:
    """`nanot5 data prepare demo [--out DIR] [--force]` | `nanot5 data prepare sni DIR`."""
    if len(argv) < 2 or argv[0] != "prepare" or argv[1] not in ("demo", "sni"):
        print("usage: nanot5 data prepare demo [--out DIR] [--force]\n"
              "       nanot5 data prepare sni DIR", file=sys.stderr)
        return 2
    if argv[1] == "sni":
        from nanot5.data.sni import prepare_sni_main

        return prepare_sni_main(argv[2:])
    from nanot5.data.demo import data_prepare_main

    return data_prepare_main(argv[1:])


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
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except Exception as e:
        # errors about the user's input name the key, file or line: show just that (set
        # NANOT5_TRACEBACK=1 for the traceback); anything else is a bug and keeps its traceback
        user_errors = ("ConfigError", "DataError", "CheckpointError", "FileNotFoundError",
                       "NotADirectoryError", "FloatingPointError")
        if type(e).__name__ in user_errors and not os.environ.get("NANOT5_TRACEBACK"):
            print(f"nanot5 {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
