"""`nanot5 sweep`: a grid of runs, resumable point by point, summarised in sweep.md and sweep.png."""

from __future__ import annotations

import json
import shutil

import pytest

from nanot5.config import ConfigError
from nanot5.sweep import parse, point_name, points
from tests.test_train import run_cli, tiny_args


def test_grid_parsing_and_points():
    base, grid, own = parse(["preset=paper-grid-tiny", "sweep.seed=0,1", "optim.total_steps=10", "out=x"])
    assert grid == {"optim.name": ["adamwscale", "adafactor"], "optim.lr_scheduler": ["cosine", "legacy"],
                    "seed": ["0", "1"]}
    assert base == ["preset=paper-grid-tiny", "optim.total_steps=10"] and own["out"] == "x"
    pts = points(grid)
    assert len(pts) == 8 and pts[0] == {"optim.name": "adamwscale", "optim.lr_scheduler": "cosine", "seed": "0"}
    assert len({point_name(p) for p in pts}) == 8
    with pytest.raises(ConfigError, match="run.dir"):
        parse(["sweep.seed=0,1", "run.dir=x"])
    with pytest.raises(ConfigError, match="nothing to sweep"):
        parse(["optim.total_steps=3"])


def test_a_half_finished_sweep_resumes_without_rerunning_finished_points(test_data, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", *tiny_args(test_data, tmp_path / "unused", "optim.total_steps=4", "checkpoint.every_steps=2",
                                "eval.every_steps=2")[1:], "sweep.optim.name=adamwscale,adafactor,adamw",
            f"out={out}"]
    args = [a for a in args if not a.startswith("run.dir=")]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr + first.stdout
    names = [point_name({"optim.name": n}) for n in ("adamwscale", "adafactor", "adamw")]
    done, fresh, half = (out / n for n in names)
    kept = (done / "summary.json").stat().st_mtime_ns
    shutil.rmtree(fresh)  # never started
    (half / "summary.json").unlink()  # stopped after its step-2 checkpoint
    shutil.rmtree(half / "final")
    shutil.rmtree(half / "checkpoints" / "step_0000004")
    again = run_cli(args)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "finished earlier, skipped" in again.stdout
    assert (done / "summary.json").stat().st_mtime_ns == kept  # not run again
    assert "resumed from" in (out / f"{half.name}.log").read_text()
    for run in (done, fresh, half):
        assert json.loads((run / "summary.json").read_text())["steps"] == 4
    table = (out / "sweep.md").read_text()
    assert table.count("| finished |") == 3 and "adafactor" in table
    assert (out / "sweep.png").stat().st_size > 10_000
