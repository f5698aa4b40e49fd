"""The run directory: one writer at a time, and nothing in it that this run did not write is touched.

- A fresh run (no `resume=`) refuses a folder that already holds a run's outputs (checkpoints, metrics,
  final/, config.yaml, ...): continue it with `resume=auto`, pick a new `run.dir`, or pass
  `run.overwrite=true`, which renames the old folder to `<dir>.old-<time>` (nothing is deleted).
- `.lock` is held with a POSIX record lock (`fcntl.lockf`) for the life of the process: the OS releases it
  when the process dies, even by SIGKILL, and unlike `flock` it is not inherited by forked DataLoader
  workers (which may outlive a killed parent by a moment). A second process on the same folder gets an
  error naming the holder's PID.
- `run.json` holds the run id; checkpoints carry it in their meta.json and retention only ever deletes
  checkpoints with this run's id.

Under torchrun only rank 0 owns the folder; the other ranks only read paths from it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from datetime import datetime
from pathlib import Path

from nanot5.errors import CheckpointError
from nanot5.fileio import atomic_write_text
from nanot5.log import info

# What a nanot5 run writes into its folder (evaluation and prediction outputs included).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "final", "best", "summary.json", "config.yaml", "loss.png",
               "samples.txt", "predictions.jsonl", "metrics.json", "tensorboard", "run.json")
LOCK = ".lock"


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


class RunDir:
    """A locked run folder (rank 0) with its run id. Build it with `RunDir.open`."""

    def __init__(self, path: Path, run_id: str, lock_fd: int | None):
        self.path, self.run_id, self._lock_fd = path, run_id, lock_fd

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @staticmethod
    def resolve(path: str | Path) -> Path:
        """run.dir as given, or runs/<timestamp> when empty."""
        return Path(path) if str(path) else default_run_dir()

    @classmethod
    def open(cls, path: str | Path, *, resume: str, overwrite: bool, is_main: bool = True) -> "RunDir":
        """Create or reopen `path` for this run (see the module docstring for the rules)."""
        path = cls.resolve(path)
        if not is_main:
            return cls(path, "", None)
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"run.dir={path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path)
        found = outputs_in(path)
        if found and not resume:
            if not overwrite:
                os.close(fd)
                raise CheckpointError(
                    f"run.dir={path} already holds a run ({', '.join(found)}); continue it with resume=auto, "
                    "choose a new run.dir, or pass run.overwrite=true to move the old one aside")
            aside = path.with_name(f"{path.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            path.rename(aside)  # the lock moves with it, so nobody starts on the old run meanwhile
            info(f"run.overwrite=true: moved the previous run in {path} to {aside}")
            path.mkdir(parents=True)
            old_fd, fd = fd, _lock(path)
            os.close(old_fd)
        run_id = _read_run_id(path) if resume else None
        if run_id is None:
            run_id = uuid.uuid4().hex
            atomic_write_text(path / "run.json", json.dumps({"run_id": run_id, "created": time.time()}) + "\n")
        return cls(path, run_id, fd)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def outputs_in(path: Path) -> list[str]:
    """The names of run outputs present in `path` (empty: nothing of a run there)."""
    return [name for name in RUN_OUTPUTS if (path / name).exists()]


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointError(f"run.dir={path} is in use by another nanot5 process (PID {holder}); wait for it "
                              "to finish or choose another run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_run_id(path: Path) -> str | None:
    """This folder's run id: run.json, else the newest checkpoint that names one (runs from before run.json)."""
    candidates = [path / "run.json"] + sorted((path / "checkpoints").glob("step_*/meta.json"), reverse=True)
    for file in candidates:
        try:
            run_id = json.loads(file.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if run_id:
            if file.name != "run.json":
                atomic_write_text(path / "run.json", json.dumps({"run_id": run_id, "created": time.time()}) + "\n")
            return str(run_id)
    return None
