"""Optimizer step time on the T5 v1.1-base parameter set (248M parameters, random gradients).

Ours and the peers run alternately in one process (the machine is shared and noisy); each round
builds one optimizer at a time, takes one untimed step (state allocation), times --steps steps,
and frees it. Reported: median and minimum s/step over all timed steps, and their ratios.

  AdamWScale (nanot5.optim, via param_groups: RMS per HF matrix)
     vs  loop: the same formula one matrix at a time, nanoT5-shaped, with a host-side
         `max(1e-3, rms)` per matrix (one device sync each)
     vs  torch.optim.AdamW, foreach and fused (a different formula, the speed yardstick)
  Adafactor (nanot5.optim)
     vs  a straightforward per-matrix Adafactor (HF's op sequence), and transformers.Adafactor

Usage: python bench/optim.py [--model t5-v1_1-base] [--rounds 3] [--steps 3] [--device cpu|cuda]
                             [--only adamwscale,loop,...]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench.common import time_steps  # noqa: E402
from nanot5.model import T5, T5Config  # noqa: E402
from nanot5.optim import Adafactor, AdamWScale, param_groups  # noqa: E402

LR = 1e-4


def logical_matrices(groups):
    """(param view, grad view) per HF matrix: fused matrices split into their row blocks."""
    out = []
    for g in groups:
        for p, n in zip(g["params"], g["row_blocks"]):
            out += list(zip(p.chunk(n), p.grad.chunk(n))) if n > 1 else [(p, p.grad)]
    return out


class LoopAdamWScale:
    """nanoT5's AdamWScale step, one matrix at a time (the per-parameter baseline)."""

    def __init__(self, groups, lr=LR, betas=(0.9, 0.999), eps=1e-6):
        self.mats = logical_matrices(groups)
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p, _ in self.mats]
        self.v = [torch.zeros_like(p) for p, _ in self.mats]

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        self.t += 1
        for (p, g), m, v in zip(self.mats, self.m, self.v):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().add_(self.eps)
            step = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
            step = step * max(1e-3, p.norm(2) / p.numel() ** 0.5)  # host read: a sync per matrix
            p.addcdiv_(m, denom, value=-step)


class LoopAdafactor:
    """Adafactor one matrix at a time in HF's op sequence (relative_step=False, no momentum)."""

    def __init__(self, groups, lr=LR, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8):
        self.mats = logical_matrices(groups)
        self.lr, self.eps, self.clip, self.decay, self.t = lr, eps, clip, decay, 0
        self.state = [(p.new_zeros(p.shape[:-1]), p.new_zeros(p.shape[-1:])) if p.ndim >= 2
                      else (torch.zeros_like(p), None) for p, _ in self.mats]

    @staticmethod
    def rms(x):
        return x.norm(2) / x.numel() ** 0.5

    @torch.no_grad()
    def step(self):
        self.t += 1
        b2t = 1.0 - self.t ** self.decay
        for (p, g), (row, col) in zip(self.mats, self.state):
            lr = max(self.eps[1], self.rms(p)) * self.lr  # host read: a sync per matrix
            update = g ** 2 + self.eps[0]
            if col is not None:
                row.mul_(b2t).add_(update.mean(dim=-1), alpha=1 - b2t)
                col.mul_(b2t).add_(update.mean(dim=-2), alpha=1 - b2t)
                r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                update = torch.mul(r, col.unsqueeze(-2).rsqrt()).mul_(g)
            else:
                row.mul_(b2t).add_(update, alpha=1 - b2t)
                update = row.rsqrt().mul_(g)
            update.div_((self.rms(update) / self.clip).clamp_(min=1.0)).mul_(lr)
            p.add_(-update)


def contenders(groups, params):
    # torch optimizers write their defaults into the group dicts they get: give each its own copies
    groups = lambda groups=groups: [dict(g) for g in groups]  # noqa: E731
    yield "adamwscale", lambda: AdamWScale(groups(), lr=LR).step
    yield "adamwscale-foreach", lambda: AdamWScale(groups(), lr=LR, fused=False).step
    yield "loop-adamwscale", lambda: LoopAdamWScale(groups()).step
    yield "torch-adamw-foreach", lambda: torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True).step
    yield "torch-adamw-fused", lambda: torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True).step
    yield "adafactor", lambda: Adafactor(groups(), lr=LR).step
    yield "loop-adafactor", lambda: LoopAdafactor(groups()).step
    try:
        from transformers import Adafactor as HFAdafactor
    except ImportError:
        return
    yield "hf-adafactor", lambda: HFAdafactor(params, lr=LR, relative_step=False).step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="t5-v1_1-base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="", help="comma-separated contender names")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU seconds; with --threads 1 it shrugs off other "
                         "processes competing for the cores (a shared machine), wall does not")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU work; use the wall clock on an accelerator")

    torch.manual_seed(0)
    model = T5(T5Config.from_name(args.model)).to(device)
    groups = param_groups(model, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    n_mats = len(logical_matrices(groups))
    print(f"{args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors "
          f"({n_mats} HF matrices); device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")

    names = [n for n, _ in contenders(groups, params)]
    if args.only:
        keep = args.only.split(",")
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown contender(s) {unknown}; choose from {names}")
        names = [n for n in names if n in keep]
    results = {n: [] for n in names}
    for r in range(args.rounds):
        for name, make in contenders(groups, params):
            if name not in results:
                continue
            step = make()
            results[name] += time_steps(step, args.steps, device, clock)
            del step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"round {r + 1}: " + ", ".join(f"{n} {min(results[n][-args.steps:]):.3f}" for n in names),
              flush=True)

    # median: typical; min: the least disturbed step, the better estimate on a shared machine
    stats = {"median": {n: statistics.median(ts) for n, ts in results.items()},
             "min": {n: min(ts) for n, ts in results.items()}}
    print(f"\n{'s/step':<22}{'median':>10}{'min':>10}   ({args.rounds} rounds x {args.steps} steps)")
    for n in names:
        print(f"{n:<22}{stats['median'][n]:>10.4f}{stats['min'][n]:>10.4f}")
    print(f"\n{'ratio':<46}{'median':>8}{'min':>8}")

    def ratio(label, num, den, target=""):
        if num in results and den in results:
            r = [stats[k][num] / stats[k][den] for k in ("median", "min")]
            print(f"{label:<46}{r[0]:>7.2f}x{r[1]:>7.2f}x  {target}")

    ratio("loop-adamwscale / adamwscale (speed-up)", "loop-adamwscale", "adamwscale",
          "target >= 2 on CPU, >= 3 on CUDA")
    ratio("adamwscale / torch-adamw-fused (slowdown)", "adamwscale", "torch-adamw-fused", "target <= 1.3")
    ratio("adamwscale / torch-adamw-foreach", "adamwscale", "torch-adamw-foreach")
    ratio("adamwscale-foreach / adamwscale", "adamwscale-foreach", "adamwscale")
    ratio("loop-adafactor / adafactor (speed-up)", "loop-adafactor", "adafactor", "target >= 1")
    ratio("hf-adafactor / adafactor (speed-up)", "hf-adafactor", "adafactor")

if __name__ == "__main__":
    main()
