"""Command line: `nanot5 <command> [key=value ...]`.

Each command lives in the module that owns its work; this file only dispatches, so `nanot5 --help`
and `nanot5 --version` answer without importing torch. User mistakes (`NanoT5Error`) print one line and
exit with code 2 (NANOT5_TRACEBACK=1 shows the traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("nanot5.train:pretrain_main", "pre-train with span corruption (default preset: nanot5-base)"),
    "finetune": ("nanot5.train:finetune_main", "fine-tune a T5 (default preset: sni)"),
    "evaluate": ("nanot5.evaluate:evaluate_main", "held-out loss/accuracy of a model directory"),
    "predict": ("nanot5.evaluate:predict_main", "generate for SNI test tasks; exact match and ROUGE-L"),
    "export": ("nanot5.evaluate:export_main", "write a checkpoint in Hugging Face format"),
    "sweep": ("nanot5.sweep:sweep_main", "run a grid of configs (sweep.KEY=v1,v2 ...) and tabulate/plot them"),
    "plan": ("nanot5.plan:plan_main", "memory per device of a training config (parameters ... activations)"),
    "tokenizer": ("nanot5.data.tokenizer:tokenizer_main", "train a SentencePiece tokenizer (tokenizer train ...)"),
    "data": ("nanot5.cli:data_main", "prepare data sets (data prepare demo|sni ...)"),
}
# nanoT5 runs `python -m nanoT5.main task=pt|ft ...`: the same arguments work as `nanot5 task=pt ...`
TASKS = {"task=pt": "pretrain", "task=ft": "finetune"}

DATA_HELP = """usage: nanot5 data prepare demo [out=DIR] [force=true]
       nanot5 data prepare sni DIR

demo: build the offline demo corpus (English prose from Debian's python3-doc and linux-doc packages,
      fetched with apt-get download) into out (default ~/.cache/nanot5/corpora/demo).
sni:  git clone Super-Natural Instructions into DIR (needs the network; about 3 GB)."""


def data_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or any(a in ("-h", "--help") for a in argv):
        print(DATA_HELP)
        return 0
    if len(argv) < 2 or argv[0] != "prepare" or argv[1] not in ("demo", "sni"):
        from nanot5.errors import ConfigError

        raise ConfigError(f"unknown data command {' '.join(argv)!r}; see `nanot5 data --help`")
    if argv[1] == "sni":
        from nanot5.data.sni import prepare_sni_main

        return prepare_sni_main(argv[2:])
    from nanot5.data.demo import data_prepare_main

    return data_prepare_main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from nanot5 import __version__
    from nanot5.errors import NanoT5Error

    parser = argparse.ArgumentParser(
        prog="nanot5",
        description="Pre-train and fine-tune T5 encoder-decoders. Options are key=value overrides, e.g. "
        "`nanot5 pretrain optim.base_lr=1e-2`; `nanot5 COMMAND --help` lists them.",
    )
    parser.add_argument("--version", action="version", version=f"nanot5 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv:
        parser.print_help()
        return 0
    task = next((a for a in argv if a in TASKS), None)
    if task is not None and argv[0] not in COMMANDS:  # nanoT5's command line
        argv = [TASKS[task]] + [a for a in argv if a != task]
    args, _ = parser.parse_known_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 2
    target, _ = COMMANDS[args.command]
    module, func = target.split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except NanoT5Error as e:
        if os.environ.get("NANOT5_TRACEBACK"):
            raise
        print(f"nanot5 {args.command}: error: {e}", file=sys.stderr)
        return 2
