"""The model benchmarks run (tiny model, smoke mode): bench/loss_memory.py and bench/attention.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_loss_memory_bench_smoke():
    out = run("bench/loss_memory.py", "--quick")
    assert "chunked / plain step peak" in out and "(equal)" in out


def test_attention_bench_smoke():
    # flex is left out: its CPU kernels take a minute to compile (test_attention.py covers it)
    out = run("bench/attention.py", "--quick", "--dtype", "fp32", "--impls", "eager,sdpa", "--train")
    assert "sdpa" in out and "LOSS DIFFERS" not in out and "training step, fp32" in out
