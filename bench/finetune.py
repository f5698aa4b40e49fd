"""Fine-tuning batch benchmark: `python bench/finetune.py [--examples N] [--batch B] [--dtype bf16|fp32] [--quick]`.

Target tokens/s and padding share of naive / grouped / packed batches (nanot5/data/batching.py) on the SNI subset
in tests/data (its train tasks, Tk-Instruct prompts, max_seq_len 1024, max_target_len 128, the T5 tokenizer),
training a t5-v1_1-small-shaped model (random init; forward + backward, bf16 autocast by default).

Method
- The same N examples for every mode: a seeded sample of the train-task records, one epoch each (all modes drop
  the same shuffled tail, so each mode trains on exactly the same examples with the same batch size B).
- Modes are timed interleaved batch by batch in one process: step k runs batch k of every mode (the order
  rotates with k), so load that drifts over seconds hits all modes alike; a mode's epoch time is the sum of its
  batch times. After one warm-up batch per mode, `--rounds` such epochs are timed; we report the median.
- target tokens/s = real (unpadded) target tokens of the epoch / epoch time; padding share = padded positions /
  all positions (inputs and targets together, and each alone). Padding shares need no model.
- FLOP ratio: the epoch's matmul FLOPs on the padded shapes (`nanot5.model.flops_per_step` per batch: rows x
  width, attention over the whole row, as block-diagonal attention computed densely costs) of naive / of each
  mode: the speedup a compute-bound device would see, independent of machine load.
- Packed rows need a model that keeps the examples of a row apart (segment ids: T5.forward(...,
  encoder_segment_ids=, decoder_segment_ids=)). When this nanot5's T5.forward has no such arguments, packed is
  timed as a *shape proxy*: the same packed tensors without segment ids, i.e. the same FLOPs as block-diagonal
  attention computed densely, but not a correct training step. The output says which one ran.
Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from nanot5.data.batching import BATCHING, Seq2SeqBatches, token_counts  # noqa: E402
from nanot5.data.sni import SNIExamples, load_sni  # noqa: E402
from nanot5.data.tokenizer import load_tokenizer  # noqa: E402
from nanot5.model import T5, T5Config, flops_per_step  # noqa: E402
from nanot5.runtime import tune_cpu_runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=256, help="examples per epoch (a seeded sample)")
    p.add_argument("--batch", type=int, default=8, help="examples per batch (nanoT5's fine-tuning batch is 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (one epoch per mode each)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--modes", default=",".join(BATCHING), help="comma-separated subset of naive,grouped,packed")
    p.add_argument("--sni-split", default="small", help="split of tests/data/sni whose train tasks are used")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--max-target-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--padding-only", action="store_true", help="padding shares only (no model)")
    p.add_argument("--quick", action="store_true", help="tiny model, few examples: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.rounds = 48, 1
    return args


def model_config(quick: bool) -> T5Config:
    if quick:
        return T5Config.from_name("t5-v1_1-tiny", dropout_rate=0.0)
    return T5Config.from_name("t5-v1_1-small", dropout_rate=0.0)


def accepts_segments() -> bool:
    return "encoder_segment_ids" in inspect.signature(T5.forward).parameters


def model_inputs(batch: dict, segments: bool, device) -> dict:
    keys = ["input_ids", "labels"]
    if "encoder_segment_ids" in batch:
        keys.append("decoder_input_ids")
        if segments:
            keys += ["encoder_segment_ids", "decoder_segment_ids"]
    else:
        keys.append("attention_mask")
    return {k: batch[k].to(device) for k in keys}


def epoch_batches(examples, mode: str, args) -> list[dict]:
    it = Seq2SeqBatches(examples, batch_size=args.batch, seed=0, batching=mode, max_seq_len=args.max_seq_len,
                        max_target_len=args.max_target_len)
    return [b for _, b in zip(range(len(it)), iter(it))]


def shares(batches: list[dict]) -> dict[str, float]:
    c = Counter()
    for b in batches:
        c.update(token_counts(b))
    return {"all": 1 - (c["input_tokens"] + c["target_tokens"]) / (c["input_positions"] + c["target_positions"]),
            "input": 1 - c["input_tokens"] / c["input_positions"],
            "target": 1 - c["target_tokens"] / c["target_positions"],
            "target_tokens": c["target_tokens"], "input_tokens": c["input_tokens"],
            "rows": sum(b["input_ids"].shape[0] for b in batches)}


def epoch_flops(cfg: T5Config, batches: list[dict]) -> float:
    return sum(flops_per_step(cfg, b["input_ids"].shape[0], b["input_ids"].shape[1], b["labels"].shape[1])
               for b in batches)


def run_batch(model, batch, segments: bool, device, bf16: bool) -> float:
    t = time.perf_counter()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**model_inputs(batch, segments, device)).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = load_tokenizer(TEST_DATA / "t5-tokenizer")
    records = load_sni(TEST_DATA / "sni", "train", split=args.sni_split)
    records = random.Random(0).sample(records, min(args.examples, len(records)))
    t = time.perf_counter()
    examples = SNIExamples(records, tok, max_source_length=args.max_seq_len, max_target_length=args.max_target_len)
    t_encode = time.perf_counter() - t
    modes = args.modes.split(",")
    batches = {m: epoch_batches(examples, m, args) for m in modes}
    n_used = len(batches[modes[0]]) * args.batch
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, device {device}, load average {os.getloadavg()[0]:.2f}")
    print(f"SNI split {args.sni_split!r} train tasks: {n_used} of {len(records)} sampled examples per epoch, "
          f"batch {args.batch}, max_seq_len {args.max_seq_len}, max_target_len {args.max_target_len} "
          f"(prompts built and tokenized in {t_encode:.1f}s)")
    pad = {m: shares(batches[m]) for m in modes}
    cfg = model_config(args.quick)
    flops = {m: epoch_flops(cfg, batches[m]) for m in modes}
    print(f"\n{'mode':<8} {'rows':>6} {'padding':>8} {'input pad':>10} {'target pad':>11} {'TFLOP/epoch':>12} "
          f"{'FLOP ratio':>11}")
    for m in modes:
        print(f"{m:<8} {pad[m]['rows']:>6} {pad[m]['all']:>8.1%} {pad[m]['input']:>10.1%} {pad[m]['target']:>11.1%} "
              f"{flops[m] / 1e12:>12.2f} {flops[modes[0]] / flops[m]:>10.2f}x")
    if args.padding_only:
        return

    torch.manual_seed(0)
    model = T5(cfg).to(device).train()
    segments = accepts_segments()
    bf16 = args.dtype == "bf16"
    print(f"\nmodel d_model={cfg.d_model} d_ff={cfg.d_ff} layers={cfg.num_layers}+{cfg.num_decoder_layers}, "
          f"{args.dtype}{' autocast' if bf16 else ''}, forward+backward; packed rows "
          + ("with segment ids" if segments else "as a SHAPE PROXY (this T5.forward takes no segment ids)"))
    for m in modes:  # warm-up
        run_batch(model, batches[m][0], segments, device, bf16)
    times: dict[str, list[float]] = {m: [] for m in modes}
    n_batches = len(batches[modes[0]])  # every mode: the same examples, as many batches
    for r in range(args.rounds):
        epoch = dict.fromkeys(modes, 0.0)
        for k in range(n_batches):
            shift = (k + r) % len(modes)
            for m in modes[shift:] + modes[:shift]:
                epoch[m] += run_batch(model, batches[m][k], segments, device, bf16)
        for m in modes:
            times[m].append(epoch[m])
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.1f}s" for m in modes), flush=True)
    base = statistics.median(times[modes[0]])
    print(f"\n{'mode':<8} {'epoch s':>8} {'target tok/s':>13} {'input tok/s':>12} {'examples/s':>11} "
          f"{'vs ' + modes[0]:>9}")
    for m in modes:
        s = statistics.median(times[m])
        label = m + ("*" if m == "packed" and not segments else "")
        print(f"{label:<8} {s:>8.2f} {pad[m]['target_tokens'] / s:>13.1f} {pad[m]['input_tokens'] / s:>12.1f} "
              f"{n_used / s:>11.2f} {base / s:>8.2f}x")
    if "packed" in modes and not segments:
        print("* shape proxy: packed tensors without segment ids (same FLOPs, not a correct training step)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
