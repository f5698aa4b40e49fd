"""Fault injection: a training run SIGKILLed at random points (mid-step, mid-save, mid-eval, while data
workers start) and resumed with resume=auto each time ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from nanot5.tracking import read_metrics
from tests.test_train import REPO, tiny_args

STEPS = 12
COMMON = [f"optim.total_steps={STEPS}", "checkpoint.every_steps=2", "eval.every_steps=4", "data.num_workers=2",
          "checkpoint.keep=2", "logging.every_steps=1"]


def run(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "NANOT5_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "nanot5", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def events(run_dir) -> list[tuple]:
    return [(e["kind"], e["step"], e["loss"]) for e in read_metrics(run_dir / "metrics.jsonl")]


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(test_data, tmp_path):
    ref = tmp_path / "ref"
    done = run(tiny_args(test_data, ref, *COMMON))
    assert done.returncode == 0, done.stderr

    # kill points from a seeded RNG: the n-th time the process reaches each point
    # (each is reached by any process that has steps left: every process starts workers and runs >= 1 step,
    # saves every 2 steps and evaluates 2 batches every 4 steps)
    rng = random.Random(0)
    plan = [f"step:{rng.randint(1, 3)}", "save:1", f"eval:{rng.randint(1, 2)}", "workers:1",
            f"step:{rng.randint(1, 3)}", "save:1"]
    run_dir = tmp_path / "killed"
    for fault in plan:
        res = run(tiny_args(test_data, run_dir, *COMMON, "resume=auto"), fault)
        assert res.returncode == -signal.SIGKILL, (fault, res.returncode, res.stderr[-3000:])
        assert not (run_dir / "final").exists()
    final = run(tiny_args(test_data, run_dir, *COMMON, "resume=auto"))
    assert final.returncode == 0, final.stderr[-3000:]

    assert events(run_dir) == events(ref)  # every logged train and held-out loss
    a, b = load_file(run_dir / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]



# A middle process forks a "worker" that runs the DataLoader worker_init_fn nanot5 installs, then the middle
# process is SIGKILLed (the training process killed while its workers start, as NANOT5_FAULT=workers:1 does).
_ORPHAN = """
import os, sys, time
from nanot5.data.loader import _die_with_parent
parent = os.getpid()
pid = os.fork()
if pid == 0:
    if sys.argv[1] == "late":
        time.sleep(0.5)  # the parent is gone before the worker starts
    _die_with_parent(parent, 0)
    time.sleep(60)  # a worker that outlives its parent would sit here (torch's watchdog never notices)
    os._exit(3)
print(pid, flush=True)
if sys.argv[1] == "late":
    os._exit(0)
time.sleep(60)
"""


def test_data_workers_end_when_the_training_process_is_killed():
    """Torch's worker watchdog notes its parent after worker_init_fn: a parent killed while the workers start
    left them waiting forever, holding its stdout/stderr (a fault-injection run hung CI that way)."""
    import time

    for when in ("late", "running"):
        proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, when], cwd=REPO, stdout=subprocess.PIPE, text=True)
        worker = int(proc.stdout.readline())
        if when == "running":
            time.sleep(0.5)
            proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and os.path.exists(f"/proc/{worker}"):
            time.sleep(0.05)
        alive = os.path.exists(f"/proc/{worker}") and "Z" not in open(f"/proc/{worker}/stat").read().split()[2]
        if alive:
            os.kill(worker, signal.SIGKILL)
        assert not alive, f"the worker outlived its parent ({when})"
