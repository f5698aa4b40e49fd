"""Where training numbers go: metrics.jsonl (one JSON object per event), TensorBoard, W&B, the terminal, loss.png."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Rank-0 sink for training events. Every event is a dict with at least `step` and `kind`."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "nanot5", config: dict | None = None, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self.truncate_after(resume_step)
        self.file = self.path.open("a")
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("[nanot5] tensorboard is not installed; skipping TensorBoard events "
                      "(pip install tensorboard, or logging.tensorboard=false)")
        if wandb:
            import wandb as wb  # an explicit request: fail loudly if missing

            self.wandb = wb.init(project=wandb_project, dir=str(run_dir), config=config,
                                 name=run_dir.name, resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop events logged after `step` (they are about to be produced again by a resumed run)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
    ax.set_title(title or "nanot5 pre-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (CI logs, files)."""

    def __init__(self, total: int, initial: int, mode: str = "auto", enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: info[k] for k in ("loss", "lr", "tok/s") if k in info}, refresh=True)
        else:
            print(" | ".join(f"{k} {v}" for k, v in {"step": step, **info}.items()), flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def measure_matmul_peak(dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of large square CPU matmuls in `dtype`: the denominator of MFU on a CPU."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * n ** 3 * runs / (time.perf_counter() - start)
