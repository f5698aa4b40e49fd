"""Atomic checkpoints of everything a run needs to continue exactly.

Layout of `<run>/checkpoints/step_0001000/`:
    model.safetensors   our state dict (weights only)
    optimizer.pt        optimizer state dict (tensors + plain containers, loaded weights_only)
    trainer.pt          step, data-loader state, RNG states, metric accumulators
    config.yaml         the resolved run config
    meta.json           written last: step and file list; a directory without it is incomplete

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
mid-save leaves every earlier checkpoint untouched. Nothing here ever deletes or overwrites a
checkpoint other than by retention (`keep` newest complete ones of the same run id), and a killed save's
temporary folder is removed at the next start.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanot5 import faults
from nanot5.errors import CheckpointError
from nanot5.fileio import fsync_dir
from nanot5.log import warn

STEP_DIR = re.compile(r"^step_(\d{7,})$")
FILES = ("model.safetensors", "optimizer.pt", "trainer.pt", "config.yaml")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


# ------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as plain Python/numpy objects, so they
    pickle across ranks and save via `to_saveable`."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1].copy(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state().numpy(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"]), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch.as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s) for s in state["cuda"]])


# ----------------------------------------------------------------- save
def to_saveable(obj: Any) -> Any:
    """numpy arrays/scalars -> torch tensors/Python numbers, so `torch.load(weights_only=True)` reads it."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_saveable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_saveable(v) for v in obj)
    return obj


def from_saveable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: from_saveable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_saveable(v) for v in obj)
    return obj


def save_checkpoint(root: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any],
                    config_yaml: str, keep: int, run_id: str = "") -> Path:
    """Write checkpoint `step` atomically under `root`, then drop all but this run's newest `keep`.

    A full disk (ENOSPC) raises a CheckpointError naming the checkpoint that could not be written and the
    newest intact one; the temporary folder is removed either way.
    """
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        faults.point("save")
        torch.save(to_saveable(optimizer_state), tmp / "optimizer.pt")
        torch.save(to_saveable(trainer_state), tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {"step": step, "files": list(FILES), "time": time.time(), "run_id": run_id}
        (tmp / "meta.json").write_text(json.dumps(meta))
        fsync_dir(tmp)
        if final.exists():  # a stale or foreign directory with this name: keep it, aside
            aside = final.with_name(f"{final.name}.old-{time.time_ns()}")
            final.rename(aside)
            warn(f"moved existing {final} aside to {aside.name}")
        tmp.rename(final)
        fsync_dir(root)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        intact = next((str(p) for p in list_checkpoints(root) if (p / "meta.json").is_file()), None)
        raise CheckpointError(f"no space left on device while writing checkpoint {final}; "
                              + (f"checkpoint {intact} is intact" if intact else "no earlier checkpoint exists")
                              + " (free some space and resume with resume=auto)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(root, keep, run_id)
    return final


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete `.tmp-step_*` folders of saves that were killed midway (call while holding the run lock, so
    no live process is writing them); returns what was removed."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-step_")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def prune(root: Path, keep: int, run_id: str) -> None:
    """Delete all but the newest `keep` complete checkpoints written by run `run_id`; checkpoints of any
    other run (or without a run id) are never touched."""
    ours = [p for p in list_checkpoints(root) if _run_id_of(p) == run_id and run_id]
    for old in ours[keep:]:
        shutil.rmtree(old)


def _run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------- load
def validate(path: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint; CheckpointError naming what is wrong otherwise."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json; the save was interrupted)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: corrupt ({e})") from e
    for name in meta.get("files", FILES):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
    return meta


def load_latest(root: Path) -> dict[str, Any] | None:
    """The newest checkpoint under root that loads, skipping (and reporting) damaged ones; None if there
    is none at all. If checkpoints exist but none is usable: a CheckpointError listing each and why."""
    rejected = []
    for path in list_checkpoints(root):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping unusable checkpoint: {e}")
            rejected.append(str(e))
    if rejected:
        raise CheckpointError(f"resume=auto: none of the {len(rejected)} checkpoints in {root} is usable: "
                              + "; ".join(rejected) + ". Resume from one with resume=PATH after repairing it, "
                              "or start a new run.dir")
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """{"step", "model", "optimizer", "trainer", "config_yaml"}; CheckpointError on any damage."""
    from safetensors.torch import load_file

    meta = validate(path)
    try:
        model = load_file(str(path / "model.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: corrupt ({type(e).__name__}: {e})") from e
    out = {"step": int(meta["step"]), "model": model, "path": path,
           "config_yaml": (path / "config.yaml").read_text()}
    for name in ("optimizer", "trainer"):
        file = path / f"{name}.pt"
        try:
            out[name] = from_saveable(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"{file}: corrupt ({type(e).__name__}: {e})") from e
    return out
