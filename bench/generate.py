"""Generation benchmark: `python bench/generate.py [--mode greedy|beam|both] [--dtype fp32|bf16|both] [--quick]`.

nanot5's `T5.generate` (KV cache) against `transformers` `generate(use_cache=True,
do_sample=False)` with identical weights: t5-v1_1-small, batch 8, 256-token inputs, exactly 64
new tokens (no EOS stopping: HF's generation config gets eos_token_id=None and ours
eos_token_id=-1), CPU; greedy (`num_beams=1`, the default mode) and/or beam search
(`--num-beams`, default 4, length_penalty 1). The script asserts that both produce identical
tokens (in fp32; bf16 rounding can flip near-ties).

Timed alternately in one process (warm-up, then `--rounds` rounds, the order rotating), medians
reported; the time includes the encoder pass. tokens/s counts returned tokens (batch x 64; beam search
generates num_beams times as many candidates per step).
Both run under the same `nanot5.runtime.tune_cpu_runtime()` settings. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench.common import build_hf, rotated, twin  # noqa: E402
from nanot5.model import T5Config  # noqa: E402
from nanot5.runtime import tune_cpu_runtime  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("greedy", "beam", "both"), default="greedy")
    p.add_argument("--num-beams", type=int, default=4, help="beams in --mode beam")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.input_len, args.new_tokens, args.rounds = 2, 32, 8, 2
    return args


def build(cfg: T5Config):
    hf = build_hf(cfg).eval()
    hf.generation_config.eos_token_id = None  # never stop early: exactly max_new_tokens tokens
    return twin(hf, cfg), hf


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = tune_cpu_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = (T5Config.from_name("t5-v1_1-tiny", vocab_size=512) if args.quick
           else T5Config.from_name("t5-v1_1-small"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, malloc tuning {'on' if settings['malloc'] else 'off'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"t5-v1_1 d_model={cfg.d_model} layers={cfg.num_layers}+{cfg.num_decoder_layers}; batch "
          f"{args.batch} x {args.input_len} input tokens, {args.new_tokens} new tokens; "
          f"{args.rounds} rounds, medians")
    ours, hf = build(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (args.batch, args.input_len), generator=g)
    mask = torch.ones_like(ids)
    # ragged inputs as in batched prediction: rows padded to the longest
    for i in range(1, args.batch):
        mask[i, args.input_len - i * args.input_len // (2 * args.batch):] = 0
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id)
    n = args.new_tokens
    modes = ["greedy", "beam"] if args.mode == "both" else [args.mode]
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    for mode in modes:
        beams = 1 if mode == "greedy" else args.num_beams
        runs = {
            "ours": lambda: ours.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=-1,
                                          num_beams=beams),
            "hf": lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, use_cache=True,
                                      do_sample=False, num_beams=beams)[:, 1:],  # drop the start token
        }
        for dtype in dtypes:
            bench(f"{mode} (num_beams={beams}), {dtype}", runs, dtype, args)


def bench(title: str, runs: dict, dtype: str, args: argparse.Namespace) -> None:
    n = args.new_tokens
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.no_grad():
        out = {name: fn() for name, fn in runs.items()}  # warm-up and output check
        assert out["ours"].shape == (args.batch, n), out["ours"].shape
        if not torch.equal(out["ours"], out["hf"]):
            rows = (out["ours"] != out["hf"]).any(1).nonzero().flatten().tolist()
            msg = f"{title}: outputs differ in rows {rows}"
            if dtype == "fp32":
                raise AssertionError(msg)
            print(f"warning: {msg} (bf16 rounding can flip near-ties)")
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.rounds):
            for name in rotated(names, r):
                t = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tok = args.batch * n
    print(f"\n{title}: outputs identical: {torch.equal(out['ours'], out['hf'])}")
    print(f"{'model':<6} {'s/call':>7} {'min..max':>13} {'new tokens/s':>12}")
    for name, sec in med.items():
        print(f"{name:<6} {sec:>7.3f} {min(times[name]):>6.3f}..{max(times[name]):<6.3f} {tok / sec:>12.1f}")
    print(f"ours / hf: {med['hf'] / med['ours']:.2f}x (medians), "
          f"{min(times['hf']) / min(times['ours']):.2f}x (fastest runs); "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
