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
