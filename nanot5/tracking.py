"""Where training numbers go: metrics.jsonl (one JSON object per event), TensorBoard, W&B, the terminal, loss.png."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from nanot5.errors import DataError
from nanot5.fileio import atomic_write, atomic_write_text
from nanot5.log import set_progress_bar, warn


class MetricsLogger:
    """Rank-0 sink for training events. Every event is a dict with at least `step` and `kind`."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "nanot5", config: dict | None = None, resume_step: int | None = None,
                 fresh: bool = False):
        """resume_step: drop events after it (a resumed run logs them again); fresh: start an empty file."""
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():
            atomic_write_text(self.path, "")
        elif resume_step is not None:
            self.truncate_after(resume_step)
        self.file = self.path.open("a")
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warn("tensorboard is not installed; skipping TensorBoard events "
                     "(pip install tensorboard, or logging.tensorboard=false)")
        if wandb:
            import wandb as wb  # an explicit request: fail loudly if missing

            self.wandb = wb.init(project=wandb_project, dir=str(run_dir), config=config,
                                 name=run_dir.name, resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop events logged after `step` (a resumed run is about to produce them again), and a torn last
        line (a crash mid-write); the file is replaced atomically."""
        if not self.path.is_file():
            return
        kept = [line for line in _complete_lines(self.path) if json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, event: dict[str, Any]) -> None:
        event = {"time": round(time.time(), 3), **event}
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        kind, step = event.get("kind", "train"), event["step"]
        numbers = {k: v for k, v in event.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _complete_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSON-lines file that parse; a torn (unparsable) LAST line is dropped, a bad
    line elsewhere is an error naming it."""
    lines = [line for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    good = []
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # written while the process died: drop it
            raise DataError(f"{path}: line {i + 1} is not JSON ({e.msg}); fix or remove that line") from None
        good.append(line)
    return good


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl (a torn last line is ignored)."""
    return [json.loads(line) for line in _complete_lines(path)]


def plot_losses(metrics_path: Path, out_path: Path, title: str = "", baseline: float | None = None) -> None:
    """loss.png: training loss and held-out loss against step; `baseline` (e.g. the corpus's unigram
    entropy, the loss of a model that ignores its input) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_path)
    train = [(e["step"], e["loss"]) for e in events if e.get("kind") == "train" and math.isfinite(e["loss"])]
    held = [(e["step"], e["loss"]) for e in events if e.get("kind") == "eval" and "loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.8)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", color="tab:orange")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    # long titles (the resolved model description) wrap instead of running off the figure
    ax.set_title(textwrap.fill(title or "nanot5 pre-training", 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (CI logs, files); log messages go through the bar."""

    def __init__(self, total: int, initial: int, mode: str = "auto", enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            set_progress_bar(self.bar)

    def update(self, step: int, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: info[k] for k in ("loss", "lr", "tok/s") if k in info}, refresh=True)
        else:
            print(" | ".join(f"{k} {v}" for k, v in {"step": step, **info}.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            set_progress_bar(None)
