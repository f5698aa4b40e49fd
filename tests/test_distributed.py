"""torchrun on CPU with gloo: DDP/FSDP equal one process, resume across world sizes, failures end the job."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanot5.tracking import read_metrics
from tests.test_train import REPO, tiny_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def torchrun(nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanot5", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run(nproc: int, test_data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = tiny_args(test_data, run_dir, "optim.batch_size=8", "data.num_readers=2", "data.num_workers=0",
                     "eval.every_steps=1000", *extra)
    res = torchrun(nproc, args) if nproc > 1 else subprocess.run(
        [sys.executable, "-m", "nanot5", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    return res


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() <= tol, k


@pytest.mark.parametrize("strategy,grad_acc", [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)])
def test_two_processes_equal_one(test_data, tmp_path, strategy, grad_acc):
    # FSDP runs torch's AdamW (AdamWScale/Adafactor need whole matrices: DDP only for now)
    common = ["optim.total_steps=3", "checkpoint.every_steps=1000", f"optim.grad_acc={grad_acc}",
              f"optim.name={'adamwscale' if strategy == 'ddp' else 'adamw'}", "optim.base_lr=1e-3"]
    run(1, test_data, tmp_path / "one", *common)
    run(2, test_data, tmp_path / "two", *common, f"distributed.strategy={strategy}")
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    one = [e["loss"] for e in read_metrics(tmp_path / "one" / "metrics.jsonl") if e["kind"] == "train"]
    two = [e["loss"] for e in read_metrics(tmp_path / "two" / "metrics.jsonl") if e["kind"] == "train"]
    assert two == pytest.approx(one, rel=1e-5)


def test_ddp_resume_with_two_and_with_one_process(test_data, tmp_path):
    common = ["optim.total_steps=6", "checkpoint.every_steps=3", "distributed.strategy=ddp"]
    ref = tmp_path / "ref"
    run(2, test_data, ref, *common)
    # only rank 0 wrote: one line per step, one set of outputs
    steps = [e["step"] for e in read_metrics(ref / "metrics.jsonl") if e["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 7))

    for nproc in (2, 1):
        again = tmp_path / f"resume{nproc}"
        shutil.copytree(ref, again)
        shutil.rmtree(again / "checkpoints" / "step_0000006")
        shutil.rmtree(again / "final")
        res = run(nproc, test_data, again, *common, "resume=auto")
        assert "resumed from" in res.stdout and "step_0000003" in res.stdout
        got = [(e["step"], e["loss"]) for e in read_metrics(again / "metrics.jsonl") if e["kind"] == "train"]
        want = [(e["step"], e["loss"]) for e in read_metrics(ref / "metrics.jsonl") if e["kind"] == "train"]
        if nproc == 2:
            assert got == want
            assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(ref).values()))
        else:  # the same data; only the order of floating-point sums differs
            assert [s for s, _ in got] == [s for s, _ in want]
            assert [l for _, l in got] == pytest.approx([l for _, l in want], rel=1e-4)
            assert_close(weights(again), weights(ref), tol=1e-4)


def test_a_dead_rank_ends_the_job_quickly(test_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = tiny_args(test_data, tmp_path / "run", "optim.batch_size=8", "data.num_workers=0",
                     "optim.total_steps=100000", "eval.every_steps=100000", "checkpoint.every_steps=100000")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "nanot5", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    start = time.time()
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert proc.poll() is None and time.time() - start < 300, "training did not start"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    killed = time.time()
    out, _ = proc.communicate(timeout=120)
    assert time.time() - killed < 60
    assert proc.returncode != 0
    assert "Signal 9" in out or "SIGKILL" in out or "exitcode" in out, out[-3000:]
