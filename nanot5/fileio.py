"""Crash-safe file writes: write to a temporary file in the same folder, fsync, rename over the target.

A reader (or a resumed run) sees the old file or the new one, never half of either; a crash mid-write
leaves at most a hidden `.NAME.*.tmp` file beside the target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) to produce the file, then rename it to `path` (same filesystem)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the text file `path` atomically (UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Put the folder `new` in place of `target` (which nanot5 wrote earlier, if it exists): the old one is
    renamed aside first and deleted only once the new one is in place, so a crash leaves one of the two."""
    import shutil

    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
