"""Atomic checkpoints of everything a run needs to continue exactly.

Layout of `<run>/checkpoints/step_0001000/` (one process, DDP):
    model.safetensors   our state dict (weights only)
    optimizer.pt        optimizer state dict (tensors + plain containers, loaded weights_only)
    trainer.pt          step, data-loader state, RNG states, metric accumulators
    config.yaml         the resolved run config
    meta.json           written last: step and file list; a directory without it is incomplete

Sharded layout (FSDP; meta.json has `"format": "dcp"`), torch.distributed.checkpoint (DCP) as in torchtitan:
    .metadata           DCP's index: every tensor's global shape and where each saved piece of it lies
    __<rank>_0.distcp   each rank's own shards of the weights and of the optimizer's tensors
    trainer.pt          as above, plus the optimizer's host values (step counts, param groups)
    config.yaml, meta.json
DCP reshards on load: the checkpoint resumes on any number of processes (FSDP, DDP or one process, where
the tensors arrive whole), and `read_sharded_model` assembles the whole weights in one process (export).

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
mid-save leaves every earlier checkpoint untouched. Nothing here ever deletes or overwrites a
checkpoint other than by retention (`keep` newest complete ones of the same run id), and a killed save's
temporary folder is removed at the next start. A sharded save is renamed into place only once every
rank's shards are on disk (DCP's last collective writes `.metadata` after all ranks reported their writes);
with `checkpoint.async_save` that happens in the background and `ShardedSave.finish` completes the folder.

Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` for our files, and DCP's pickled
`.metadata` through an unpickler that admits only DCP's own metadata classes (`_MetadataUnpickler`);
nanot5 never stores pickled objects in the shards, and a checkpoint that does is refused.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
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
DCP = "dcp"  # meta.json "format" of a sharded checkpoint (absent: the single-file format above)


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

    final = step_dir(root, step)
    tmp = new_temporary(root, step)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        faults.point("save")
        torch.save(to_saveable(optimizer_state), tmp / "optimizer.pt")
        torch.save(to_saveable(trainer_state), tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {"step": step, "files": list(FILES), "time": time.time(), "run_id": run_id}
        _put_in_place(tmp, final, meta)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise disk_full(root, final) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(root, keep, run_id)
    return final


def new_temporary(root: Path, step: int) -> Path:
    """A fresh hidden folder `.tmp-step_N-<pid>-<ns>` to write checkpoint `step` into."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir(root, step).name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


def _put_in_place(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """meta.json last, then rename the finished temporary folder to its step name (durably)."""
    (tmp / "meta.json").write_text(json.dumps(meta))
    fsync_dir(tmp)
    if final.exists():  # a stale or foreign directory with this name: keep it, aside
        aside = final.with_name(f"{final.name}.old-{time.time_ns()}")
        final.rename(aside)
        warn(f"moved existing {final} aside to {aside.name}")
    tmp.rename(final)
    fsync_dir(final.parent)


def disk_full(root: Path, final: Path) -> CheckpointError:
    """The one-line error for ENOSPC while writing `final`, naming the newest intact checkpoint."""
    intact = next((str(p) for p in list_checkpoints(root) if (p / "meta.json").is_file()), None)
    return CheckpointError(f"no space left on device while writing checkpoint {final}; "
                           + (f"checkpoint {intact} is intact" if intact else "no earlier checkpoint exists")
                           + " (free some space and resume with resume=auto)")


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in `e`: its cause chain or, for DCP's CheckpointException, any rank's failure."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        for failure in (getattr(x, "failures", None) or {}).values():  # DCP: {rank: (exception, traceback)}
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
        stack += [x.__cause__, x.__context__]
    return False


# ------------------------------------------------------- sharded save (DCP)
class ShardedSave:
    """One sharded checkpoint on its way to disk. `start` (every rank) writes the shards into a hidden
    temporary folder, synchronously or in the background; `finish` (every rank) waits for the write and
    then, on rank 0, writes meta.json, renames the folder into place and applies retention.

    Only rank 0 touches the folder outside DCP; every rank must see the same folder (a shared filesystem
    when the ranks run on several machines, as DCP itself requires).
    """

    def __init__(self, root: Path, step: int, tmp: Path, meta: dict[str, Any], keep: int, run_id: str,
                 is_main: bool):
        self.root, self.step, self.tmp, self.meta = root, step, tmp, meta
        self.final = step_dir(root, step)
        self.keep, self.run_id, self.is_main = keep, run_id, is_main
        self.future = None  # the background write (async_save), None once it is done or when synchronous

    @classmethod
    def start(cls, root: Path, step: int, *, tensors: dict[str, Any], trainer_state: dict[str, Any],
              config_yaml: str, keep: int, run_id: str, async_group=None) -> "ShardedSave":
        """Collective: every rank passes its own shards in `tensors` (DTensors are saved as their local
        pieces; plain tensors once). `async_group`: a gloo process group for a background write
        (`torch.distributed.checkpoint.async_save`), None to write before returning."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from nanot5 import distributed

        is_main = distributed.rank() == 0
        tmp = Path(distributed.broadcast_object(str(new_temporary(root, step)) if is_main else None))
        meta = {"step": step, "time": time.time(), "run_id": run_id, "format": DCP,
                "world_size": distributed.world_size()}
        save = cls(root, step, tmp, meta, keep, run_id, is_main)
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True)
        failure = None
        try:
            if async_group is None:
                with warnings.catch_warnings():  # without a process group DCP says it assumes one process: it is
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.save(tensors, storage_writer=writer)
            else:  # stages a CPU copy of `tensors` now, then writes in a thread; training goes on meanwhile
                save.future = dcp.async_save(tensors, storage_writer=writer, process_group=async_group)
            if is_main:  # the small files now: they hold this step's trainer state
                torch.save(to_saveable(trainer_state), tmp / "trainer.pt")
                (tmp / "config.yaml").write_text(config_yaml)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException (a BaseException): every rank
            failure = e
        save._agree(failure, collective=True)
        faults.point("save")  # shards written (or being written), meta.json not yet
        return save

    def done(self) -> bool:
        """The shards are all on disk (or the write failed): `finish` will not block. No communication."""
        return self.future is None or self.future.done()

    def finish(self, collective: bool = True) -> Path | None:
        """Wait for the shards, then (rank 0) meta.json, rename into place, retention; the checkpoint's
        path on rank 0. A failed write raises CheckpointError and removes the temporary folder.
        `collective`: all ranks call this together and agree on the outcome (a synchronous save);
        False for the background case, where each rank finishes on its own once its write is done."""
        from torch.distributed.checkpoint.api import CheckpointException

        failure = None
        try:
            if self.future is not None:
                future, self.future = self.future, None
                future.result()
            if self.is_main:
                self.meta["files"] = sorted(p.name for p in self.tmp.iterdir())
                _put_in_place(self.tmp, self.final, self.meta)
        except (Exception, CheckpointException) as e:
            failure = e
        self._agree(failure, collective)
        if not self.is_main:
            return None
        prune(self.root, self.keep, self.run_id)
        return self.final

    def _agree(self, failure: BaseException | None, collective: bool) -> None:
        """Raise on every rank if the write failed on any (collective), else on this rank if it failed here.
        A full disk is the one-line CheckpointError; anything else is re-raised where it happened (a bug
        shows its traceback) and named on the other ranks. The temporary folder goes either way."""
        from nanot5 import distributed

        mine = None
        if failure is not None:
            first = (str(failure).strip().splitlines() or [""])[0]
            mine = str(disk_full(self.root, self.final)) if _is_disk_full(failure) else \
                f"checkpoint {self.final} was not written: {type(failure).__name__}: {first}"
        found = [m for m in (distributed.all_gather_objects(mine) if collective else [mine]) if m]
        if not found:
            return
        self._discard()
        if failure is not None and not _is_disk_full(failure):
            raise failure
        raise CheckpointError(mine or found[0])

    def _discard(self) -> None:
        if self.is_main and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


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


def load_latest(root: Path, weights: bool = True) -> dict[str, Any] | None:
    """The newest checkpoint under root that loads, skipping (and reporting) damaged ones; None if there
    is none at all. If checkpoints exist but none is usable: a CheckpointError listing each and why.
    `weights`: as for `load_checkpoint`."""
    rejected = []
    for path in list_checkpoints(root):
        try:
            return load_checkpoint(path, weights=weights)
        except CheckpointError as e:
            warn(f"skipping unusable checkpoint: {e}")
            rejected.append(str(e))
    if rejected:
        raise CheckpointError(f"resume=auto: none of the {len(rejected)} checkpoints in {root} is usable: "
                              + "; ".join(rejected) + ". Resume from one with resume=PATH after repairing it, "
                              "or start a new run.dir")
    return None


def load_checkpoint(path: Path, weights: bool = True) -> dict[str, Any]:
    """{"step", "format", "model", "optimizer", "trainer", "config_yaml", "path"}; CheckpointError on any damage.

    format "full": model and optimizer are whole state dicts. format "dcp" (sharded): "optimizer" is None
    (restore it with `read_sharded`, which reshards), "model" the whole weights read in this process, or
    None with weights=False (a resume reads only its own shards). Its index and file sizes are checked here.
    """
    from safetensors.torch import load_file

    meta = validate(path)
    sharded = meta.get("format") == DCP
    if sharded:
        _check_shards(path)
        model = read_sharded_model(path) if weights else None
    else:
        try:
            model = load_file(str(path / "model.safetensors"))
        except Exception as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: corrupt ({type(e).__name__}: {e})") from e
    out = {"step": int(meta["step"]), "format": DCP if sharded else "full", "model": model, "path": path,
           "config_yaml": (path / "config.yaml").read_text(), "optimizer": None}
    for name in ("trainer",) if sharded else ("optimizer", "trainer"):
        file = path / f"{name}.pt"
        try:
            out[name] = from_saveable(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"{file}: corrupt ({type(e).__name__}: {e})") from e
    return out


# ------------------------------------------------------- sharded load (DCP)
_METADATA_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its `.metadata` index; unpickle only DCP's own metadata classes, dtypes, sizes and paths,
    so a crafted checkpoint cannot run code (the counterpart of `torch.load(weights_only=True)`)."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as md

        obj = None
        if module == md.__name__:
            obj = getattr(md, name, None)
            obj = obj if isinstance(obj, type) and obj.__module__ == module else None
        elif (module, name) in _METADATA_CLASSES or (module.split(".")[0] == "pathlib" and name.endswith("Path")):
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")
        return obj


def _reader(path: Path):
    """DCP's FileSystemReader with the safe unpickler for `.metadata`, refusing pickled objects in shards
    (DCP would load those with torch.load(weights_only=False); nanot5 writes tensors only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            try:
                with open(path / ".metadata", "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path / '.metadata'}: corrupt ({type(e).__name__}: {e})") from None
            objects = [k for k, v in getattr(metadata, "state_dict_metadata", {}).items()
                       if isinstance(v, BytesStorageMetadata)]
            if objects or not isinstance(getattr(metadata, "storage_data", None), dict):
                raise CheckpointError(f"{path}: not a nanot5 sharded checkpoint (pickled objects {objects[:3]})")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _check_shards(path: Path) -> None:
    """The index reads and every piece it lists lies inside its file (a torn or truncated shard fails here,
    before a resume commits to this checkpoint)."""
    metadata = _reader(path).read_metadata()
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, need in sizes.items():
        file = path / name
        have = file.stat().st_size if file.is_file() else -1
        if have < need:
            raise CheckpointError(f"{file}: " + ("missing" if have < 0 else f"truncated ({have} of {need} bytes)"))


def read_sharded(path: Path, state: dict[str, Any], local: bool = False) -> None:
    """Fill `state` ({"model": {fqn: tensor}, "optimizer": {fqn: {name: tensor}}}, any subset) in place from
    sharded checkpoint `path`. DTensors receive their own shards, plain tensors the whole tensor: DCP
    reshards to any process count. Collective across the process group if there is one (local=False)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    no_dist = local or not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():  # without a process group DCP says it assumes one process: it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=_reader(path), no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        first = (str(e).strip().splitlines() or [""])[-1]
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first})") from None


def read_sharded_model(path: Path) -> dict[str, torch.Tensor]:
    """The whole weights {fqn: tensor} of sharded checkpoint `path`, read in this process alone: no process
    group and no particular world size needed (export, evaluate, predict, model.checkpoint_path)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _reader(path).read_metadata()
    model = {key[len("model."):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for key, md in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not model:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    read_sharded(path, {"model": model}, local=True)
    return model
