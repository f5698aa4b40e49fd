"""`nanot5 sweep`: a grid of runs over one base config, resumable, summarised as a table and a plot.

    nanot5 sweep [command=pretrain|finetune] [preset=NAME] [key=value ...] sweep.KEY=v1,v2 ... \\
                 [out=DIR] [nproc=N]

Every `sweep.KEY=v1,v2,...` is an axis over any config key (e.g. `sweep.optim.name=adamwscale,adafactor
sweep.seed=0,1`); a preset may bring its own grid (a `sweep:` section, e.g. preset=paper-grid-tiny).
Each point of the grid (all combinations, first axis slowest) runs as its own process — with
`nproc=N`, one torchrun job of N processes — into `out/<point>/` with `resume=auto`, so running the
same command again skips finished points and continues interrupted ones. Finally `out/sweep.md` holds
the results (held-out loss and accuracy, mean and spread over seeds, steps, tokens, wall time) and
`out/sweep.png` the held-out loss curves of all points.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from nanot5.config import ConfigError, load_config, preset_sweep
from nanot5.fileio import atomic_write, atomic_write_text
from nanot5.log import info
from nanot5.tracking import read_metrics

OWN_KEYS = ("out", "nproc", "command")
HELP = __doc__


def parse(argv: list[str]) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """(base overrides, grid {key: values}, own options) from the command line."""
    base, grid, own = [], {}, {"command": "pretrain", "nproc": "1", "out": ""}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {arg!r}")
        if key in OWN_KEYS:
            own[key] = value
        elif key.startswith("sweep."):
            values = [v.strip() for v in value.split(",") if v.strip()]
            if not values:
                raise ConfigError(f"{key}: give the values to sweep over, comma-separated")
            grid[key.removeprefix("sweep.")] = values
        elif key in ("run.dir", "resume"):
            raise ConfigError(f"{key}: the sweep sets it for every point; use out=DIR for the sweep's folder")
        else:
            base.append(arg)
    if own["command"] not in ("pretrain", "finetune"):
        raise ConfigError(f"command={own['command']!r}: use pretrain or finetune")
    if not own["nproc"].isdigit() or int(own["nproc"]) < 1:
        raise ConfigError(f"nproc={own['nproc']!r}: expected a positive number of processes per point")
    preset = next((a.partition("=")[2] for a in base if a.startswith("preset=")), "")
    grid = {**{k: [str(v) for v in vs] for k, vs in (preset_sweep(preset) if preset else {}).items()}, **grid}
    if not grid:
        raise ConfigError("nothing to sweep: add sweep.KEY=v1,v2 (any config key), or a preset with a sweep: grid")
    return base, grid, own


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    """A folder name for a point: its settings, e.g. `optim.name=adafactor,seed=1`."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{k}={v}" for k, v in point.items()))


def _status(run_dir: Path) -> str:
    """finished | interrupted | new | started."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except ValueError:
            return "started"
        return "interrupted" if data.get("interrupted") else "finished"
    return "started" if run_dir.exists() else "new"


def run_point(command: str, base: list[str], point: dict[str, str], run_dir: Path, nproc: int) -> int:
    """Run (or continue) one point as a child process; its output goes to run_dir/../NAME.log."""
    args = [command, *base, *(f"{k}={v}" for k, v in point.items()), f"run.dir={run_dir}", "resume=auto",
            "logging.progress=lines"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nanot5", *args]
    else:
        cmd = [sys.executable, "-m", "nanot5", *args]
    log = run_dir.with_name(run_dir.name + ".log")
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode


def sweep_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: nanot5 sweep [command=pretrain|finetune] [preset=NAME] [key=value ...] sweep.KEY=v1,v2 ... "
              "[out=DIR] [nproc=N]\n\n" + HELP.strip())
        return 0
    base, grid, own = parse(argv)
    command, nproc = own["command"], int(own["nproc"])
    out = Path(own["out"] or Path("runs") / f"sweep-{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}")
    todo = points(grid)
    mode = "pt" if command == "pretrain" else "ft"
    default_preset = "nanot5-base" if command == "pretrain" else "sni"
    for point in todo:  # every point's config is valid before anything runs
        load_config(base + [f"{k}={v}" for k, v in point.items()], default_preset=default_preset, mode=mode)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps({"command": command, "base": base, "grid": grid}, indent=2))
    info(f"sweep of {len(todo)} points over {', '.join(grid)} -> {out}")
    results = []
    for i, point in enumerate(todo, 1):
        run_dir = out / point_name(point)
        status = _status(run_dir)
        label = " ".join(f"{k}={v}" for k, v in point.items())
        if status == "finished":
            info(f"[{i}/{len(todo)}] {label}: finished earlier, skipped")
        else:
            info(f"[{i}/{len(todo)}] {label}: {'continuing' if status != 'new' else 'running'} "
                 f"(log: {run_dir.name}.log)")
            t0 = time.time()
            rc = run_point(command, base, point, run_dir, nproc)
            status = _status(run_dir)
            if rc != 0:
                info(f"[{i}/{len(todo)}] {label}: failed (exit {rc}); see {run_dir.name}.log")
            elif status == "interrupted":
                info(f"[{i}/{len(todo)}] {label}: interrupted; run the same command again to continue")
                break
            else:
                info(f"[{i}/{len(todo)}] {label}: done in {time.time() - t0:.0f} s")
        results.append(collect(point, run_dir))
    table = write_table(out / "sweep.md", grid, results)
    plot_curves(out / "sweep.png", results, grid)
    print(table)
    info(f"results: {out / 'sweep.md'}, curves: {out / 'sweep.png'}")
    return 0


# ------------------------------------------------------------------- results
def collect(point: dict[str, str], run_dir: Path) -> dict[str, Any]:
    """A point's final numbers and held-out curve (whatever exists of them)."""
    result: dict[str, Any] = {"point": point, "dir": run_dir, "status": _status(run_dir), "curve": []}
    if (run_dir / "summary.json").is_file():
        result.update(json.loads((run_dir / "summary.json").read_text()))
    if (run_dir / "metrics.jsonl").is_file():
        result["curve"] = [(e["step"], e["loss"]) for e in read_metrics(run_dir / "metrics.jsonl")
                           if e.get("kind") == "eval" and "loss" in e]
    return result


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def write_table(path: Path, grid: dict[str, list[str]], results: list[dict[str, Any]]) -> str:
    """sweep.md: one row per setting (seeds pooled: mean ± sample std), then one row per run."""
    axes = [k for k in grid if k != "seed"]
    axes_text = ", ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in grid.items())
    lines = ["# Sweep results", "", f"Grid: {axes_text}", ""]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(tuple(r["point"].get(k) for k in axes), []).append(r)
    lines += ["| " + " | ".join(axes + ["runs", "held-out loss", "held-out accuracy", "steps", "wall time (s)"])
              + " |", "|" + "---|" * (len(axes) + 5)]
    for key, runs in groups.items():
        done = [r for r in runs if r["status"] == "finished"]
        lines.append("| " + " | ".join(list(key) + [
            f"{len(done)}/{len(runs)}", _mean_std([r.get("heldout_loss") for r in done]),
            _mean_std([r.get("heldout_accuracy") for r in done]),
            str(done[0].get("steps", "—")) if done else "—",
            f"{sum(r.get('wall_time_s', 0) for r in done) / len(done):.0f}" if done else "—"]) + " |")
    lines += ["", "| run | status | held-out loss | accuracy | steps | tokens | wall time (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        loss, acc = r.get("heldout_loss"), r.get("heldout_accuracy")
        lines.append(f"| `{r['dir'].name}` | {r['status']} | {'—' if loss is None else f'{loss:.4f}'} | "
                     f"{'—' if acc is None else f'{acc:.4f}'} | {r.get('steps', '—')} | {r.get('tokens', '—')} | "
                     f"{r.get('wall_time_s', '—')} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def plot_curves(path: Path, results: list[dict[str, Any]], grid: dict[str, list[str]]) -> None:
    """sweep.png: held-out loss against step for every point (one colour per setting, one line style per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [k for k in grid if k != "seed"]
    settings = list(dict.fromkeys(tuple(r["point"].get(k) for k in axes) for r in results))
    seeds = list(dict.fromkeys(r["point"].get("seed") for r in results))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for r in results:
        if not r["curve"]:
            continue
        setting = tuple(r["point"].get(k) for k in axes)
        color = plt.cm.tab10(settings.index(setting) % 10)
        seed = r["point"].get("seed")
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(axes, setting)) or "base"
        first_seed = seeds.index(seed) == 0
        ax.plot(*zip(*r["curve"]), styles[seeds.index(seed) % len(styles)], color=color, marker="o", ms=3,
                label=label + (f" (seed {seed})" if seed is not None and len(seeds) > 1 else "") if first_seed
                or len(seeds) == 1 else None)
    finals = [r["curve"][-1][1] for r in results if r["curve"]]
    if finals:  # zoom on where the runs end (the first evaluations are far above)
        lo, hi = min(finals), max(finals)
        ax.set_ylim(lo - 0.5 * (hi - lo + 0.1), hi + 2.0 * (hi - lo + 0.1))
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats / target token)")
    ax.set_title(f"nanot5 sweep: {len(results)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
