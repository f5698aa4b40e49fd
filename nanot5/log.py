"""Console messages for every module: one rank-aware helper instead of scattered prints.

Under torchrun only rank 0 speaks (unless `all_ranks=True`); while a progress bar is on screen, messages
go through it so the bar is redrawn below them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_bar: Any = None  # the active tqdm bar, set by tracking.Progress


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def set_progress_bar(bar: Any) -> None:
    global _bar
    _bar = bar


def info(message: str, *, all_ranks: bool = False) -> None:
    """A normal message on stdout, prefixed with [nanot5]."""
    if all_ranks or is_main_process():
        _emit(f"[nanot5] {message}", sys.stdout)


def warn(message: str, *, all_ranks: bool = False) -> None:
    """Something went wrong but the run goes on (stderr)."""
    if all_ranks or is_main_process():
        _emit(f"[nanot5] warning: {message}", sys.stderr)


def _emit(text: str, stream) -> None:
    if _bar is not None:
        _bar.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)
