"""Training-step benchmark: `python bench/model_step.py [--dtype fp32|bf16|both] [--quick]`.

Forward+backward throughput of nanot5's T5 against `transformers.T5ForConditionalGeneration`
with identical weights (t5-v1_1-small, batch 8, 512 input / 114 target tokens, CPU), in fp32
and in bf16 autocast. HF runs with its default attention ("sdpa") and with "eager"; the faster
of the two is the peer we compare against.

Method
- All models live in one process and are timed alternately: after a warm-up, each round runs
  `--steps` steps of every model (the order rotates per round); we report medians over all
  timed steps. The machine is shared, so alternating spreads any noise over all models.
- Everything runs under the same process-wide settings: `nanot5.runtime.tune_cpu_runtime()`
  (glibc malloc keeps freed memory; `--no-malloc-tuning` turns it off for all models) and
  torch's default thread count.
- tokens/s counts input + target tokens. GFLOP/s uses `nanot5.model.flops_per_step` (matmul
  FLOPs, backward = 2x forward) for every model, so it is a rescaled tokens/s. MFU divides it by
  the matmul peak measured in this process: the best of large square fp32 `torch.mm` (MKL) and
  oneDNN's fp32 matmul, and of bf16 `torch.mm` (oneDNN).
- Peak memory: each model runs alone in a fresh subprocess (same settings, same batch, 3 steps);
  we report the process's peak RSS (VmHWM) and its growth over the RSS right after the
  model was built ("step" = activations, gradients, workspaces). Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench.common import build_hf, rotated  # noqa: E402
from nanot5.hf import from_hf_state_dict  # noqa: E402
from nanot5.model import T5, T5Config, flops_per_step  # noqa: E402
from nanot5.hardware import measure_matmul_peak  # noqa: E402
from nanot5.runtime import tune_cpu_runtime  # noqa: E402

MODELS = ("ours", "hf_sdpa", "hf_eager")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and dtype")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=114)
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated subset of ours,hf_sdpa,hf_eager (one HF model at least)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model peak-RSS subprocesses")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc at its defaults (for all models)")
    p.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)  # memory-measurement worker
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.input_len, args.target_len = 2, 64, 16
        args.rounds, args.steps, args.warmup = 2, 1, 1
    return args


def model_config(quick: bool) -> T5Config:
    if quick:
        return T5Config.from_name("t5-v1_1-tiny", vocab_size=512)
    return T5Config.from_name("t5-v1_1-small")


# ------------------------------------------------------------------ models
def build_models(cfg: T5Config) -> dict[str, torch.nn.Module]:
    hf = build_hf(cfg)
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    ours = T5(cfg).train()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return {"ours": ours, "hf_sdpa": hf, "hf_eager": eager}


def make_batch(cfg: T5Config, args, seed: int = 0) -> dict[str, torch.Tensor]:
    # span-corrupted pre-training batches are dense: no padding, no attention mask
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, cfg.vocab_size, (args.batch, args.input_len), generator=g),
            "labels": torch.randint(2, cfg.vocab_size, (args.batch, args.target_len), generator=g)}


def train_step(model: torch.nn.Module, batch: dict, bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    return loss.item()


# ------------------------------------------------------------------ peak
def matmul_peak(bf16: bool) -> float:
    """Best GFLOP/s of a 2048^3 matmul in the step's dtype (nanot5.hardware: the MFU denominator of training logs)."""
    return measure_matmul_peak(torch.bfloat16 if bf16 else torch.float32) / 1e9


# ------------------------------------------------------------------ memory
def rss_mib(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident set of this process in MiB. Unlike ru_maxrss,
    VmHWM starts afresh in an exec'd child instead of inheriting the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(args) -> None:
    """Worker: build one model, run 3 steps, print its RSS numbers as JSON."""
    import transformers  # noqa: F401  (same imports in every worker)

    cfg = model_config(args.quick)
    if args.child == "ours":
        model = T5(cfg).train()
    else:
        model = build_hf(cfg)
        if args.child == "hf_eager":
            model.set_attn_implementation("eager")
    batch = make_batch(cfg, args)
    built = rss_mib()
    for _ in range(3):
        train_step(model, batch, args.dtype == "bf16")
    print(json.dumps({"built_mib": built, "peak_mib": rss_mib("VmHWM")}))


def measure_memory(args, name: str, dtype: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--dtype", dtype,
           "--threads", str(torch.get_num_threads()),
           "--batch", str(args.batch), "--input-len", str(args.input_len),
           "--target-len", str(args.target_len)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    if args.no_malloc_tuning:
        env["NANOT5_NO_MALLOC_TUNING"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {name}/{dtype} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.no_malloc_tuning:
        os.environ["NANOT5_NO_MALLOC_TUNING"] = "1"
    settings = tune_cpu_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_memory(args)
        return
    import transformers

    cfg = model_config(args.quick)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"malloc tuning {'on' if settings['malloc'] else 'off'}, load average {os.getloadavg()[0]:.2f}")
    print(f"model d_model={cfg.d_model} d_ff={cfg.d_ff} layers={cfg.num_layers}+{cfg.num_decoder_layers} "
          f"heads={cfg.num_heads} vocab={cfg.vocab_size}; batch {args.batch} x ({args.input_len} + "
          f"{args.target_len}) tokens; {args.rounds} rounds x {args.steps} steps, medians")
    models = {k: v for k, v in build_models(cfg).items() if k in args.models.split(",")}
    batch = make_batch(cfg, args)
    tokens = args.batch * (args.input_len + args.target_len)
    flops = flops_per_step(cfg, args.batch, args.input_len, args.target_len)

    # same weights, same loss (fp32): guards against comparing different computations
    losses = {name: train_step(m, batch, bf16=False) for name, m in models.items()}
    spread = (max(losses.values()) - min(losses.values())) / min(losses.values())
    assert spread < 1e-4, f"models disagree: {losses}"

    results = {}
    for dtype in dtypes:
        bf16 = dtype == "bf16"
        peak = matmul_peak(bf16)
        for _ in range(args.warmup):
            for m in models.values():
                train_step(m, batch, bf16)
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for r in range(args.rounds):
            for name in rotated(names, r):
                for _ in range(args.steps):
                    t = time.perf_counter()
                    train_step(models[name], batch, bf16)
                    times[name].append(time.perf_counter() - t)
        peak = max(peak, matmul_peak(bf16))  # best of before and after: the machine is shared
        for name, ts in times.items():
            sec = statistics.median(ts)
            results[dtype, name] = dict(sec=sec, tok_s=tokens / sec, gflops=flops / sec / 1e9,
                                        mfu=flops / sec / 1e9 / peak, spread=(min(ts), max(ts)))
        results[dtype, "peak"] = peak
        if not args.no_memory:
            for name in models:
                results[dtype, name].update(measure_memory(args, name, dtype))
        report(results, dtype, list(models))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other work on this machine inflates "
          "the times; the ratios come from alternating runs)")


def report(results: dict, dtype: str, names: list[str]) -> None:
    peak = results[dtype, "peak"]
    peer = max([n for n in names if n.startswith("hf")], key=lambda n: results[dtype, n]["tok_s"])
    print(f"\n{dtype}: measured matmul peak {peak:.0f} GFLOP/s; peer = {peer}")
    print(f"{'model':<9} {'s/step':>7} {'min..max':>13} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6} "
          f"{'peak RSS':>9} {'step RSS':>9} {'vs peer':>8} {'(min)':>6}")
    for name in names:
        r = results[dtype, name]
        mem = (f"{r['peak_mib']:>6.0f}MiB {r['peak_mib'] - r['built_mib']:>6.0f}MiB"
               if "peak_mib" in r else f"{'-':>9} {'-':>9}")
        print(f"{name:<9} {r['sec']:>7.3f} {r['spread'][0]:>6.3f}..{r['spread'][1]:<6.3f} "
              f"{r['tok_s']:>9.0f} {r['gflops']:>8.1f} {r['mfu']:>6.1%} {mem} "
              f"{r['tok_s'] / results[dtype, peer]['tok_s']:>7.2f}x "
              f"{results[dtype, peer]['spread'][0] / r['spread'][0]:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
