"""Attention implementations on this machine: `python bench/attention.py [--dtype fp32|bf16|both] [--train] [--quick]`.

Held-out evaluation forward (no gradients, as `nanot5.evaluate` runs it): t5-v1_1-small, batch 8,
512 input / 114 target tokens, dense rows (pre-training batches have no padding). One model per
attention implementation (eager, sdpa, flex), identical weights, timed alternately in one
process after a warm-up (flex compiles its kernels, one per shape, in the warm-up); medians.
tokens/s counts input + target tokens. Every variant's loss must equal eager's (1e-5 fp32, 1e-2
bf16) or the row is marked.
`--train` adds a forward+backward step of eager vs sdpa (flex has no CPU backward in torch 2.13).
`--padded` uses padded rows (random lengths) instead of dense ones. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from nanot5.model import T5, T5Config  # noqa: E402
from nanot5.runtime import tune_cpu_runtime  # noqa: E402

IMPLS = ("eager", "sdpa", "flex")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=114)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (one forward per model each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and dtype")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of eager,sdpa,flex")
    p.add_argument("--train", action="store_true", help="also time a training step, eager vs sdpa")
    p.add_argument("--padded", action="store_true", help="padded rows instead of dense ones")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.input_len, args.target_len, args.rounds, args.warmup = 2, 64, 16, 2, 1
    return args


def make_batch(cfg: T5Config, args, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(2, cfg.vocab_size, (args.batch, args.input_len), generator=g),
             "labels": torch.randint(2, cfg.vocab_size, (args.batch, args.target_len), generator=g)}
    if args.padded:  # each row keeps a random length of at least a quarter
        lens = torch.randint(args.input_len // 4, args.input_len + 1, (args.batch,), generator=g)
        mask = (torch.arange(args.input_len)[None] < lens[:, None]).long()
        tlens = torch.randint(args.target_len // 4, args.target_len + 1, (args.batch,), generator=g)
        tmask = torch.arange(args.target_len)[None] < tlens[:, None]
        batch.update(input_ids=batch["input_ids"] * mask, attention_mask=mask,
                     labels=batch["labels"].masked_fill(~tmask, -100), decoder_attention_mask=tmask.long())
    return batch


def timed(fn) -> tuple[float, float]:
    t = time.perf_counter()
    loss = fn()
    return time.perf_counter() - t, loss


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = T5Config.from_name("t5-v1_1-tiny", vocab_size=512) if args.quick else T5Config.from_name("t5-v1_1-small")
    impls = args.impls.split(",")
    torch.manual_seed(0)
    base = T5(cfg)
    models = {}
    for impl in impls:
        models[impl] = T5(dataclasses.replace(cfg, attention=impl)).eval()
        models[impl].load_state_dict(base.state_dict())
    batch = make_batch(cfg, args)
    tokens = args.batch * (args.input_len + args.target_len)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.2f}; {'t5-v1_1-tiny' if args.quick else 't5-v1_1-small'}, "
          f"batch {args.batch} x ({args.input_len} + {args.target_len}) tokens, "
          f"{'padded' if args.padded else 'dense'} rows; {args.rounds} alternating rounds, medians")

    def evaluate(model, bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(**batch).loss.item()

    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        bf16 = dtype == "bf16"
        compile_s = {}
        for impl, m in models.items():
            t = time.perf_counter()
            for _ in range(args.warmup):
                evaluate(m, bf16)
            compile_s[impl] = time.perf_counter() - t
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        losses = {}
        for r in range(args.rounds):
            for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                sec, losses[impl] = timed(lambda: evaluate(models[impl], bf16))
                times[impl].append(sec)
        ref = statistics.median(times["eager"]) if "eager" in times else None
        tol = 1e-2 if bf16 else 1e-5
        print(f"\nevaluation forward, {dtype}")
        print(f"{'impl':<6} {'s/batch':>8} {'min..max':>15} {'tokens/s':>9} {'vs eager':>9} {'warm-up s':>10} {'loss':>10}")
        for impl, ts in times.items():
            sec = statistics.median(ts)
            ok = "" if "eager" not in losses or abs(losses[impl] - losses["eager"]) <= tol * losses["eager"] else "  LOSS DIFFERS"
            vs = f"{ref / sec:>8.2f}x" if ref else f"{'-':>9}"
            print(f"{impl:<6} {sec:>8.3f} {min(ts):>7.3f}..{max(ts):<7.3f} {tokens / sec:>9.0f} {vs} "
                  f"{compile_s[impl]:>10.1f} {losses[impl]:>10.6f}{ok}", flush=True)

        if args.train and "eager" in models and "sdpa" in models:
            train = {impl: models[impl].train() for impl in ("eager", "sdpa")}

            def step(model):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss
                loss.backward()
                return loss.item()

            for m in train.values():
                step(m)
            ttimes = {impl: [] for impl in train}
            for r in range(args.rounds):
                for impl in (("eager", "sdpa") if r % 2 == 0 else ("sdpa", "eager")):
                    ttimes[impl].append(timed(lambda: step(train[impl]))[0])
            e, s = statistics.median(ttimes["eager"]), statistics.median(ttimes["sdpa"])
            print(f"training step, {dtype}: eager {e:.3f} s, sdpa {s:.3f} s (sdpa/eager speed {e / s:.2f}x)")
            for m in train.values():
                m.eval()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (timings are noisy on a shared machine; "
          "the ratios come from alternating runs)")


if __name__ == "__main__":
    main()
