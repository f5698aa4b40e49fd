"""Peak memory of a training step, plain loss vs chunked loss: `python bench/loss_memory.py [--quick]`.

The plain path materialises the fp32 (B, T, V) logits, and autograd keeps more copies of that size
(log-softmax output, its gradient, the logits' gradient); `T5.forward(..., return_logits=False)`
runs the lm_head + cross-entropy in chunks of target positions and never holds more than one
chunk's logits (nanot5.model.chunked_lm_loss). Model: t5-v1_1-small, batch 8, 512 input / 114
target tokens, fp32 (or --dtype bf16 autocast), CPU; `--gradient-checkpointing` keeps only the
blocks' inputs, so the loss's share of the step's memory shows.

Method (what is measured and why it can be trusted)
- Each variant runs in a fresh subprocess (same settings), twice per variant, alternating.
- glibc malloc is set to serve every allocation of >= 1 MiB with its own mmap and to return it to
  the OS on free (a fixed M_MMAP_THRESHOLD, which also turns off glibc's adaptive threshold), so
  the resident set follows the live tensors instead of the allocator's high-water mark.
- Before a step the peak resident set (VmHWM) is reset to the current one (`echo 5 >
  /proc/self/clear_refs`, Linux >= 4.0); after it, peak - before = the step's peak memory. Step 1
  includes allocating the gradients; step 2 (gradients already allocated, as in training) is
  the steady state and is the number we compare.
- The loss of both variants is printed; it must agree to 1e-5 (fp32).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("plain", "chunked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=114)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=2, help="subprocesses per variant (alternating)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute block activations in backward (model.gradient_checkpointing)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.input_len, args.target_len, args.repeats = 2, 64, 16, 1
    return args


def kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB: big blocks are mmapped and given back
    import torch

    from nanot5.model import T5, T5Config

    if args.threads:
        torch.set_num_threads(args.threads)
    name, extra = ("t5-v1_1-tiny", {"vocab_size": 512}) if args.quick else ("t5-v1_1-small", {})
    cfg = T5Config.from_name(name, gradient_checkpointing=args.gradient_checkpointing, **extra)
    torch.manual_seed(0)
    model = T5(cfg).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (args.batch, args.input_len), generator=g)
    labels = torch.randint(2, cfg.vocab_size, (args.batch, args.target_len), generator=g)
    out = {}
    for step in (1, 2):
        model.zero_grad(set_to_none=False)  # keep the gradient buffers after step 1, as training does
        before = kib("VmRSS")
        reset_peak()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(ids, labels=labels, return_logits=args.child == "plain").loss
        loss.backward()
        out[f"step{step}_mib"] = (kib("VmHWM") - before) / 1024
        out["loss"] = loss.item()
    out["logits_mib"] = args.batch * args.target_len * cfg.vocab_size * 4 / 2**20
    print(json.dumps(out))


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--dtype", args.dtype,
           "--batch", str(args.batch), "--input-len", str(args.input_len),
           "--target-len", str(args.target_len), "--threads", str(args.threads)]
    cmd += ["--quick"] * args.quick + ["--gradient-checkpointing"] * args.gradient_checkpointing
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    import torch

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, load average "
          f"{os.getloadavg()[0]:.2f}; {'t5-v1_1-tiny' if args.quick else 't5-v1_1-small'}, batch {args.batch} x "
          f"({args.input_len} + {args.target_len}) tokens, {args.dtype}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            results[v].append(run_child(args, v))
    print(f"fp32 logits alone: {results['plain'][0]['logits_mib']:.0f} MiB")
    print(f"{'variant':<8} {'step 1 peak':>12} {'step 2 peak':>12} {'loss':>12}")
    best = {}
    for v, rs in results.items():
        s1, s2 = min(r["step1_mib"] for r in rs), min(r["step2_mib"] for r in rs)
        best[v] = s2
        print(f"{v:<8} {s1:>9.0f}MiB {s2:>9.0f}MiB {rs[0]['loss']:>12.6f}")
    lp, lc = results["plain"][0]["loss"], results["chunked"][0]["loss"]
    diff = abs(lp - lc) / abs(lp)
    print(f"chunked / plain step peak: {best['chunked'] / best['plain']:.3f} "
          f"({1 - best['chunked'] / best['plain']:.1%} lower); loss relative difference {diff:.1e} "
          f"({'equal' if diff <= (1e-5 if args.dtype == 'fp32' else 1e-3) else 'DIFFERENT'})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
