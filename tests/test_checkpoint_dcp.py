"""Sharded checkpoints (torch.distributed.checkpoint): resharding the optimizers' state from 2 FSDP processes to 2
and to 1, asynchronous saves, a full disk on one rank, retention, and loading that never runs pickled code.
The end-to-end runs (torchrun, SIGKILL mid-save, resume on 1 and 2 processes, HF export) are in
test_distributed.py, next to the one-process references they compare with."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from nanot5 import distributed
from nanot5.checkpoint import (
    DCP,
    ShardedSave,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    read_sharded,
)
from nanot5.errors import CheckpointError
from tests.test_distributed import SHARD_CASES, _groups, _sharded_toy

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")

OPTIMIZERS = ("adamwscale", "adafactor-momentum")  # AdamWScale's moments; Adafactor's factored statistics + momentum


def _grads(steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen) * (0.5 + 2 * (t % 3)) for p in _sharded_toy().parameters()]
            for t in range(steps)]


def _train(model, opt, grads) -> None:
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements) \
                if hasattr(p, "device_mesh") else g
        opt.step()
        opt.zero_grad(set_to_none=True)


def _whole(model) -> dict[str, torch.Tensor]:
    return {n: distributed.full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


def _assert_close(got: dict, want: dict, tol: float, what: str) -> None:
    for n in want:
        err = ((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item()
        assert err <= tol, f"{what}: {n} differs by {err:.2e}"


def _save(root: Path, step: int, model, opt, *, background: bool, keep: int = 10, run_id: str = "run") -> ShardedSave:
    tensors, host = distributed.sharded_state_dicts(model, opt)
    return ShardedSave.start(root, step, tensors=tensors, trainer_state={"step": step, "optimizer": host},
                             config_yaml="", keep=keep, run_id=run_id,
                             async_group=distributed.checkpoint_group() if background else None)


def _restore(path: Path, model, opt) -> None:
    ckpt = load_checkpoint(path, weights=False)
    assert ckpt["format"] == DCP and ckpt["model"] is None
    distributed.load_sharded_state_dicts(model, opt, lambda t: read_sharded(path, t), ckpt["trainer"]["optimizer"])


def _init(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)


def _reshard_worker(rank: int, world: int, tmp: str) -> None:
    """Per optimizer: 2 steps on FSDP shards (uneven, and one rank without rows of `one_row`), a sharded
    checkpoint (asynchronous for the second optimizer, the weights changed while it is written), 2 more
    steps after restoring into a fresh sharded model; the parent then restores into one process."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, tmp)
    try:
        grads = _grads(4)
        for i, name in enumerate(OPTIMIZERS):
            make = SHARD_CASES[name][0]
            background = i == 1
            model = _sharded_toy()
            fully_shard(model)
            opt = make(_groups(model))
            _train(model, opt, grads[:2])
            root = Path(tmp) / name
            pending = _save(root, 2, model, opt, background=background)
            at_save = _whole(model)
            if background:  # training goes on while the shards are written: they hold step 2 regardless
                _train(model, opt, grads[2:])
                assert not torch.equal(_whole(model)["big"], at_save["big"])  # (on every rank)
                pending.finish(collective=False)
                dist.barrier()
            else:
                pending.finish()
            model = _sharded_toy()
            fully_shard(model)
            opt = make(_groups(model))
            _restore(root / "step_0000002", model, opt)
            restored = _whole(model)  # (a collective: once, on every rank)
            assert all(torch.equal(restored[n], at_save[n]) for n in at_save), name
            _train(model, opt, grads[2:])
            after = _whole(model)
            if rank == 0:
                torch.save(after, Path(tmp) / f"{name}-2proc.pt")
    finally:
        dist.destroy_process_group()


def test_optimizer_state_reshards_from_two_fsdp_processes_to_two_and_to_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reshard_worker, args=(2, str(tmp_path)), nprocs=2)
    grads = _grads(4)
    for name in OPTIMIZERS:
        make = SHARD_CASES[name][0]
        ref = _sharded_toy()  # one process, no checkpoint
        _train(ref, make(_groups(ref)), grads)
        two = torch.load(tmp_path / f"{name}-2proc.pt", weights_only=True)
        _assert_close(two, _whole(ref), 1e-6, f"{name}, 2 -> 2 processes")
        one = _sharded_toy()  # no process group here: DCP hands the plain tensors their whole values
        opt = make(_groups(one))
        _restore(tmp_path / name / "step_0000002", one, opt)
        _train(one, opt, grads[2:])
        _assert_close(_whole(one), _whole(ref), 1e-6, f"{name}, 2 -> 1 process")
        assert not torch.equal(_whole(one)["big"], _sharded_toy().big), "never moved"


def _disk_full_worker(rank: int, world: int, tmp: str, background: bool) -> None:
    """Checkpoint 1 written; checkpoint 2 hits ENOSPC on rank 1 only: both ranks get the one-line error, the
    temporary folder goes, checkpoint 1 stays. Then retention with keep=1 next to another run's checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as fs
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, tmp)
    try:
        model = _sharded_toy()
        fully_shard(model)
        opt = SHARD_CASES["adamwscale"][0](_groups(model))
        _train(model, opt, _grads(1))
        root = Path(tmp) / "checkpoints"
        first = _save(root, 1, model, opt, background=background)
        first.finish(collective=not background)
        dist.barrier()

        real = fs._write_item
        if rank == 1:
            def full_disk(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            fs._write_item = full_disk
        try:
            with pytest.raises(CheckpointError, match=r"no space left on device while writing checkpoint "
                                                      r".*step_0000002; checkpoint .*step_0000001 is intact"):
                _save(root, 2, model, opt, background=background).finish(collective=not background)
        finally:
            fs._write_item = real
        dist.barrier()
        left = sorted(p.name for p in root.iterdir())
        assert left == ["step_0000001"], f"rank {rank}: {left}"  # no temporary folder left
        assert load_checkpoint(root / "step_0000001", weights=False)["step"] == 1
        dist.barrier()  # every rank has looked at the folder before rank 0 adds to it

        if rank == 0:  # another run's checkpoint in the same folder
            shutil.copytree(root / "step_0000001", root / "step_0000000")
            meta = json.loads((root / "step_0000000" / "meta.json").read_text())
            (root / "step_0000000" / "meta.json").write_text(json.dumps({**meta, "step": 0, "run_id": "other"}))
        dist.barrier()
        _save(root, 3, model, opt, background=background, keep=1).finish(collective=not background)
        dist.barrier()
        assert [p.name for p in list_checkpoints(root)] == ["step_0000003", "step_0000000"]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_disk_full_on_one_rank_keeps_the_previous_checkpoint_and_retention_spares_other_runs(tmp_path, background):
    import torch.multiprocessing as mp

    mp.spawn(_disk_full_worker, args=(2, str(tmp_path), background), nprocs=2)


# ------------------------------------------------------ one process: damaged and malicious checkpoints
def _one_process_checkpoints(root: Path, steps=(1, 2)) -> None:
    """Sharded checkpoints written without a process group (DCP's single-process mode): same format."""
    model = _sharded_toy()
    opt = SHARD_CASES["adafactor"][0](_groups(model))
    for step in steps:
        _train(model, opt, _grads(1))
        _save(root, step, model, opt, background=False).finish()


def test_a_truncated_shard_is_reported_and_skipped_by_resume_auto(tmp_path):
    root = tmp_path / "checkpoints"
    _one_process_checkpoints(root)
    shard = root / "step_0000002" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="__0_0.distcp: truncated"):
        load_checkpoint(root / "step_0000002")
    assert load_latest(root, weights=False)["step"] == 1


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_crafted_checkpoint_index_does_not_run_code(tmp_path):
    root = tmp_path / "checkpoints"
    _one_process_checkpoints(root, steps=(1,))
    ckpt = root / "step_0000001"
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="not allowed in a checkpoint index"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_pickled_objects_in_shards_are_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "checkpoints"
    _one_process_checkpoints(root, steps=(1,))
    ckpt = root / "step_0000001"
    (ckpt / ".metadata").unlink()
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    # DCP would unpickle this with torch.load(weights_only=False) on load
    dcp.save({"model": {"w": torch.zeros(2)}, "extra": {"anything": [1, 2]}}, checkpoint_id=str(ckpt), no_dist=True)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "files": sorted(p.name for p in ckpt.iterdir()
                                                                       if p.name != "meta.json")}))
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_checkpoint(ckpt)
