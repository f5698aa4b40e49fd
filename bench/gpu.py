"""The whole GPU story in one command: correctness on the device first, then speed, memory, the optimizer
step, generation and the projected pre-training time; a table on stdout and a JSON file.

On the project's device tool (`run`: bash from the repository root on a GPU machine with no network but a
`python3` that holds torch, triton and transformers; nanot5 runs from the source tree there, and
scripts/setup.sh must NOT run there: it would try to pip-install into a fresh .venv and fail offline),
with timeout_s=560 (the budget leaves ~100 s for a compile that overruns its estimate and the summary):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu.py --budget-s 460 --results-dir "$OUT" 2>&1 | tee "$OUT/gpu.log"

The JSON (`gpu-<device-name>.json`, layout in bench/results/README.md) is rewritten after every check,
variant and section, so a run cut short still leaves its numbers; it and the log come back from $OUT.
Elsewhere `python bench/gpu.py` writes bench/results/gpu-<device-name>.json. CPU smoke run (a test runs
it): `python bench/gpu.py --smoke` (tiny model, a few steps, the checks the CPU supports, compiled
variants through the `aot_eager` backend, a simulated out-of-memory to exercise the micro-batch probe).

Sections, in order (each in try/except: an error is recorded and the next section runs; a section, check
or variant that would not fit in what is left of --budget-s is skipped and says so):
  env       device, torch/transformers versions, the bf16 peak FLOP/s that MFU divides by
            (nanot5.hardware.peak_flops: the vendor table on a GPU, a measured matmul on a CPU) and a
            measured large bf16 matmul for context.
  checks    fp32 on the device (TF32 off), against the readable paths: our model == HF's with the same
            weights (hf_twin); chunked loss == plain loss, and their gradients (chunked_vs_plain); packed
            rows == examples alone (packed_vs_unpacked); flex == eager logits (flex_forward), gradients of
            every parameter incl. both relative-bias tables (flex_grads), on packed rows (flex_packed);
            a compiled training step == the eager one, loss and gradients (compiled_vs_eager_step, and
            compiled_flex_vs_eager_step). Each records pass/fail/skip, its differences and tolerances.
  train     T5 (--model, default t5-v1_1-base), --input-len/--target-len 512/114, bf16 autocast, global
            batch 128 as micro-batches x gradient accumulation: the micro-batch is probed from --micro
            (default: the global batch) down by halving on out-of-memory. One step = train.py's step:
            nanot5.train.accumulate_gradients (our models with return_logits=False: the chunked loss),
            grad-norm clipping at 1.0, AdamWScale (nanoT5's optimizer), zero_grad. Variants (priority
            order; each its own copy of the same initial weights):
              ours_eager, hf_eager, hf_sdpa, ours_compiled_flex (per-block compile as train.py's
              model.compile, flex attention: what training on CUDA runs), hf_sdpa_compiled (torch.compile
              of the whole HF model), ours_whole_flex (whole-model torch.compile), ours_compiled (per
              block, eager attention), hf_eager_compiled, ours_whole.
            Each: warm-up steps (the first compiles; the last measures memory), timed steps right away,
            then alternating rounds over all variants. Step time = median, torch.cuda.synchronize only
            around the timed region; MFU = nanot5.model.flops_per_step / step time / peak. Peak memory =
            torch.cuda.max_memory_allocated during a step (peak stats reset before it) minus what was
            allocated before it, plus the variant's own weights and optimizer state (what it would use
            alone). A variant's numbers are marked invalid unless its checks pass and its first step's
            loss equals ours_eager's (same weights, same batch) to 1e-2.
  optimizer the optimizer step alone on the --model parameter set: AdamWScale (fused and foreach) vs
            torch AdamW (fused and foreach), alternating (bench/optim.py's contenders).
  generate  greedy tokens/s, ours (`--gen-attention`, default auto) vs HF `generate` (sdpa), same weights,
            bf16, ragged batch, fixed length (no EOS stop); first an fp32 check that our readable path
            (eager attention) and HF produce identical tokens (a small batch).
  beam      the same with --beams beams, on whatever time the sections before it left.
  summary   the projected wall time of nanoT5's recipe (65,536 steps x the best valid step time) next to
            nanoT5's 0.56 s/step on one A100 (arXiv 2309.02373), and the issue's GPU targets (T5-base step
            >= 45% MFU on H100/H200-class cards, >= 1.5x HF compiled, peak memory below HF's): met / not
            met / n/a. Only numbers measured in this process, on this device, are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()  # the budget counts from here: imports included
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import build_hf, rotated, sync, time_steps, twin  # noqa: E402
from nanot5.build import set_matmul_precision  # noqa: E402
from nanot5.fileio import atomic_write_text  # noqa: E402
from nanot5.hardware import measure_matmul_peak, peak_flops  # noqa: E402
from nanot5.model import T5, T5Config, flops_per_step  # noqa: E402
from nanot5.optim import build_optimizer, param_groups  # noqa: E402
from nanot5.train import accumulate_gradients  # noqa: E402

# priority order: the checks that speed numbers depend on (GATES) first
CHECKS = ("hf_twin", "chunked_vs_plain", "flex_grads", "compiled_flex_vs_eager_step", "compiled_vs_eager_step",
          "packed_vs_unpacked", "flex_forward", "flex_packed")
# the gates of the variants that matter most (ours_eager, ours_compiled_flex, HF): these run whenever any
# budget is left, since a speed number without them does not count; the others leave room for speed
CRITICAL_CHECKS = ("hf_twin", "chunked_vs_plain", "flex_grads", "compiled_flex_vs_eager_step")
# name: (family, attention, compile); priority order (a short budget keeps the first ones)
VARIANTS = {
    "ours_eager": ("nanot5", "eager", None),
    "hf_eager": ("hf", "eager", None),
    "hf_sdpa": ("hf", "sdpa", None),
    "ours_compiled_flex": ("nanot5", "flex", "block"),
    "hf_sdpa_compiled": ("hf", "sdpa", "whole"),
    "ours_whole_flex": ("nanot5", "flex", "whole"),
    "ours_compiled": ("nanot5", "eager", "block"),
    "hf_eager_compiled": ("hf", "eager", "whole"),
    "ours_whole": ("nanot5", "eager", "whole"),
}
# the checks a variant's numbers depend on (plus: its first loss equals ours_eager's)
GATES = {
    "ours_eager": ("chunked_vs_plain",),
    "ours_compiled": ("chunked_vs_plain", "compiled_vs_eager_step"),
    "ours_whole": ("chunked_vs_plain", "compiled_vs_eager_step"),
    "ours_compiled_flex": ("chunked_vs_plain", "flex_grads", "compiled_flex_vs_eager_step"),
    "ours_whole_flex": ("chunked_vs_plain", "flex_grads", "compiled_flex_vs_eager_step"),
    **{name: ("hf_twin",) for name in VARIANTS if name.startswith("hf_")},
}
FIRST_LOSS_TOL = 1e-2  # bf16 autocast: the same weights and batch give the same loss to ~1e-3
LR = 1e-3  # speed does not depend on it; small enough that no variant diverges in a few steps
GRAD_CLIP = 1.0  # nanoT5's optim.grad_clip
RECIPE_STEPS = 65_536  # nanoT5's pre-training run (arXiv 2309.02373, section 3)
NANOT5_A100_STEP_S = 0.56  # nanoT5 paper: T5-base, batch 128, bf16 + compile, one A100
TARGET_MFU = 0.45  # issue 14, on H100/H200-class cards
TARGET_VS_HF_COMPILED = 1.5
# rough seconds before a variant's first timed step (compile included), until one has been measured
# (guesses for one H100/H200-class GPU: per-block = two block graphs, whole = all 24 blocks traced)
EST_WARMUP_S = {"cuda": {None: 15.0, "block": 60.0, "whole": 120.0}, "cpu": {None: 5.0, "block": 15.0, "whole": 15.0}}
EST_SECTION_S = {"cuda": {"optimizer": 15.0, "generate": 45.0, "beam": 30.0},
                 "cpu": {"optimizer": 3.0, "generate": 5.0, "beam": 5.0}}

FULL = dict(model="t5-v1_1-base", vocab=0, global_batch=128, input_len=512, target_len=114, micro=0,
            warmup=2, steps=2, rounds=3, gen_batch=64, gen_input_len=512, gen_new_tokens=64, gen_rounds=3,
            beams=4, opt_steps=5, opt_rounds=3, compile_backend="inductor", simulate_oom_above=0)
SMOKE = dict(model="t5-v1_1-tiny", vocab=512, global_batch=8, input_len=64, target_len=16, micro=8,
             warmup=2, steps=1, rounds=2, gen_batch=2, gen_input_len=32, gen_new_tokens=8, gen_rounds=2,
             beams=2, opt_steps=2, opt_rounds=2, compile_backend="aot_eager",
             simulate_oom_above=4)  # exercises the micro-batch probe: 8 rows "OOM", 4 fit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps (the CPU test)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip what would not fit in this many seconds")
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--model", help="preset name (default t5-v1_1-base; smoke t5-v1_1-tiny)")
    p.add_argument("--vocab", type=int, help="vocabulary size override (0: the preset's)")
    p.add_argument("--global-batch", type=int)
    p.add_argument("--input-len", type=int)
    p.add_argument("--target-len", type=int)
    p.add_argument("--micro", type=int, help="first micro-batch tried (0: the global batch), halved on OOM")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (>= 2: compile, then memory)")
    p.add_argument("--steps", type=int, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, help="rounds of timed steps (the first right after warm-up)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset, in priority order")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of the checks")
    p.add_argument("--flex-cpu", action="store_true",
                   help="CPU: also run the flex forward checks (compiling flex kernels takes ~30 s there)")
    p.add_argument("--gen-batch", type=int)
    p.add_argument("--gen-input-len", type=int)
    p.add_argument("--gen-new-tokens", type=int)
    p.add_argument("--gen-rounds", type=int)
    p.add_argument("--gen-attention", default="auto", help="our attention in generation (auto: CUDA flex, CPU sdpa)")
    p.add_argument("--beams", type=int, help="beam-search section with this many beams (< 2: skip)")
    p.add_argument("--opt-steps", type=int)
    p.add_argument("--opt-rounds", type=int)
    # test hooks: raise in the named section/check/variant (comma-separated), or treat micro-batches of
    # more rows than this as out of memory (exercises the probe where nothing runs out of memory)
    p.add_argument("--inject-error", default="", help=argparse.SUPPRESS)
    p.add_argument("--simulate-oom-above", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.warmup = max(2, args.warmup)
    unknown = set(filter(None, args.variants.split(","))) - set(VARIANTS)
    unknown |= set(filter(None, args.checks.split(","))) - set(CHECKS)
    if unknown:
        p.error(f"unknown variant/check name(s): {', '.join(sorted(unknown))}")
    return args


# ----------------------------------------------------------------------------- the report
def finite(x):
    """JSON-safe: non-finite floats become null (JSON has no NaN/inf); containers recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


class Report:
    """The JSON document, rewritten (atomically) after every piece of work."""

    def __init__(self, path: Path, args, argv):
        self.path = path
        self.t0 = T0
        self.data = {
            "schema": 1, "script": "bench/gpu.py", "argv": list(argv),
            "mode": "smoke" if args.smoke else "full", "complete": False,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget_s, "elapsed_s": 0.0,
            "env": {}, "settings": {}, "sections": {}, "checks": {}, "train": {}, "optimizer": {},
            "generate": {}, "projection": {}, "targets": [],
        }
        not_run = {"status": "skip", "reason": "not run: its section was skipped or failed"}
        self.data["checks"] = {name: dict(not_run) for name in CHECKS}  # the same layout however far it got
        self.data["train"] = {name: dict(not_run) for name in VARIANTS}

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(finite(self.data), indent=1, allow_nan=False) + "\n")


class Budget:
    def __init__(self, seconds: float, t0: float):
        self.t0, self.total = t0, seconds

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)


def inject(args, name: str) -> None:
    if name in args.inject_error.split(","):
        raise RuntimeError(f"injected error in {name} (--inject-error)")


def error_record(e: BaseException) -> dict:
    return {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc(limit=8)[-4000:]}


# ----------------------------------------------------------------------------- numerics
def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def grad_diff(ref: torch.nn.Module, other: torch.nn.Module) -> tuple[float, str]:
    """Largest relative-norm difference of the gradients of same-named parameters, and its name
    (inf where one model has a gradient and the other none)."""
    worst, name = 0.0, ""
    theirs = dict(other.named_parameters())
    for n, p in ref.named_parameters():
        q = theirs[n]
        if (p.grad is None) != (q.grad is None):
            return math.inf, n
        if p.grad is not None:
            d = rel_norm(q.grad, p.grad)
            if not d <= worst:  # also catches NaN
                worst, name = d, n
    return worst, name


def verdict(diffs: dict, tol: dict) -> str:
    return "pass" if all(isinstance(diffs.get(k), float) and diffs[k] <= t for k, t in tol.items()) else "fail"


# ----------------------------------------------------------------------------- batches
def padded_batch(cfg: T5Config, B: int, S: int, T: int, device, seed: int = 1) -> dict:
    """Random ids with ragged padding (row 0 full, later rows shorter) in the encoder and the decoder."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(2, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, B):
        mask[i, S - i * S // (B + 1):] = 0
        labels[i, T - i * T // (B + 1):] = -100
    batch = dict(input_ids=ids.masked_fill(mask == 0, cfg.pad_token_id), attention_mask=mask, labels=labels,
                 decoder_attention_mask=(labels != -100).long())
    return {k: v.to(device) for k, v in batch.items()}


# (input length, target length) of the examples packed into 2 rows: row 0 = examples 0, 1; row 1 = 2, 3
# (tests/test_attention.py's packing tests use the same batch)
PACKED_EXAMPLES = [(7, 3), (12, 6), (5, 2), (9, 4)]
PACKED_ROWS = [[0, 1], [2, 3]]


def packed_batch(cfg: T5Config, scale: int, device, seed: int = 3):
    """Four examples packed by hand into two padded rows with segment ids, and the examples alone;
    `scale` multiplies every length."""
    lengths = [(s * scale, t * scale) for s, t in PACKED_EXAMPLES]
    rows = PACKED_ROWS
    g = torch.Generator().manual_seed(seed)
    examples = [(torch.randint(2, cfg.vocab_size, (s,), generator=g),
                 torch.randint(2, cfg.vocab_size, (t,), generator=g)) for s, t in lengths]
    S = 1 + max(sum(lengths[j][0] for j in row) for row in rows)  # every row ends in padding
    T = 1 + max(sum(lengths[j][1] for j in row) for row in rows)
    ids = torch.full((len(rows), S), cfg.pad_token_id)
    labels = torch.full((len(rows), T), -100)
    enc_seg, dec_seg = torch.zeros_like(ids), torch.zeros_like(labels)
    for r, row in enumerate(rows):
        s0 = t0 = 0
        for k, j in enumerate(row, start=1):
            x, y = examples[j]
            ids[r, s0:s0 + len(x)], enc_seg[r, s0:s0 + len(x)] = x, k
            labels[r, t0:t0 + len(y)], dec_seg[r, t0:t0 + len(y)] = y, k
            s0, t0 = s0 + len(x), t0 + len(y)
    batch = dict(input_ids=ids, labels=labels, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
    return {k: v.to(device) for k, v in batch.items()}, [(x.to(device), y.to(device)) for x, y in examples]


def dense_batch(cfg: T5Config, B: int, S: int, T: int, device, seed: int = 0) -> dict:
    """A pre-training batch: span-corrupted rows are dense (no padding, no masks)."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, cfg.vocab_size, (B, S), generator=g).to(device),
            "labels": torch.randint(2, cfg.vocab_size, (B, T), generator=g).to(device)}


def split(batch: dict, micro: int) -> list[dict]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, n, micro)]


# ----------------------------------------------------------------------------- models
def with_attention(cfg: T5Config, attention: str) -> T5Config:
    return dataclasses.replace(cfg, attention=attention)


def compile_ours(model: T5, mode: str | None, backend: str):
    """What calls our model in a step: per-block compile in place (train.py's model.compile), or a
    whole-model torch.compile wrapper, or the model itself."""
    if mode == "block":
        for block in (*model.encoder.blocks, *model.decoder.blocks):
            block.compile(backend=backend)
    elif mode == "whole":
        return torch.compile(model, backend=backend)
    return model


def hf_forward(module):
    """HF's forward with the calling convention of nanot5.train.accumulate_gradients (return_logits is
    ours; HF always returns logits) and no decoder cache in training."""
    def forward(return_logits: bool = True, **batch):
        return module(**batch, use_cache=False)

    return forward


def state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the weights and the optimizer state: what a variant holds between steps."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        n += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return n


def dynamo_stats() -> tuple[int, dict]:
    """Graphs torch.compile has built so far in this process, and its graph-break reasons with counts."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0), dict(counters["graph_break"])


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the bench
class GPUBench:
    def __init__(self, args, argv):
        self.args, self.dev = args, args.device
        self.budget = Budget(args.budget_s, T0)
        overrides = {"vocab_size": args.vocab} if args.vocab else {}
        self.cfg = T5Config.from_name(args.model, **overrides)
        self.amp = torch.autocast(self.dev.type, dtype=torch.bfloat16)
        self.device_name = self.dev.type
        if self.dev.type == "cuda":
            try:
                self.device_name = torch.cuda.get_device_name(self.dev)
            except Exception as e:  # the env section records the error; the file still gets a name
                print(f"cannot read the CUDA device name: {e}", flush=True)
        slug = re.sub(r"[^a-z0-9]+", "-", self.device_name.lower()).strip("-") or "device"
        self.report = Report(Path(args.results_dir) / f"gpu-{slug}{'-smoke' if args.smoke else ''}.json", args,
                             argv)
        self.data = self.report.data
        self.data["env"].update(device=self.dev.type, device_name=self.device_name)
        with torch.device("meta"):
            n_params = T5(self.cfg).num_parameters()
        self.data["settings"] = dict(
            model=args.model, vocab_size=self.cfg.vocab_size, parameters=n_params, input_len=args.input_len,
            target_len=args.target_len, global_batch=args.global_batch, precision="bf16", optimizer="adamwscale",
            lr=LR, grad_clip=GRAD_CLIP, warmup_steps=args.warmup, timed_steps_per_round=args.steps,
            rounds=args.rounds, flops_per_step=flops_per_step(self.cfg, args.global_batch, args.input_len,
                                                              args.target_len))
        self.peak = math.nan
        self.hf_master = None  # the HF model every speed variant copies (on the CPU)
        self.variants: dict = {}  # name -> live objects of a ready variant
        self.est = dict(EST_WARMUP_S[self.dev.type])
        if self.dev.type == "cpu" and args.compile_backend == "inductor":
            self.est.update(block=120.0, whole=180.0)

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        sections = [("env", self.env, 0.0), ("checks", self.checks, 0.0), ("train", self.train, 0.0),
                    ("optimizer", self.optimizer, self.section_need("optimizer")),
                    ("generate", self.generate, self.section_need("generate")),
                    ("beam", self.beam, self.section_need("beam"))]
        try:
            for name, fn, need in sections:
                self.section(name, fn, need)
        finally:
            self.section("summary", self.summary, 0.0)
            self.data["complete"] = True
            self.report.save()
            try:
                print_tables(self.data)
            except Exception as e:  # the JSON is written; a printing bug must not hide it
                print(f"could not print the tables: {type(e).__name__}: {e}")
            print(f"\nresults: {self.report.path}", flush=True)
        return self.data

    def section_need(self, name: str) -> float:
        if name == "beam" and self.args.beams < 2:
            return 0.0
        return EST_SECTION_S[self.dev.type][name]

    def later_need(self, after: str) -> float:
        """Seconds to keep for the sections after `after`: the optimizer step and greedy generation (the
        beam section runs only on what is left over)."""
        order = ["optimizer", "generate"]
        later = order[order.index(after) + 1:] if after in order else [] if after == "beam" else order
        return sum(self.section_need(s) for s in later)

    def section(self, name: str, fn, need: float) -> None:
        entry = self.data["sections"][name] = {"status": "running"}
        if name != "summary" and self.budget.left() < need:
            entry.update(status="skipped", reason=f"budget: {self.budget.left():.0f} s left, needs ~{need:.0f} s")
            self.report.save()
            print(f"[{name}] skipped ({entry['reason']})", flush=True)
            return
        self.report.save()
        print(f"\n[{name}] ({self.budget.left():.0f} s of budget left)", flush=True)
        t = time.perf_counter()
        try:
            inject(self.args, name)
            fn()
            entry["status"] = "done"
        except Exception as e:  # record it and go on: the next section may still work
            entry.update(error_record(e))
            print(f"[{name}] ERROR {entry['error']}", flush=True)
        finally:
            entry["seconds"] = round(time.perf_counter() - t, 2)
            self.report.save()

    # ------------------------------------------------------------------ env
    def env(self) -> None:
        import transformers

        a, env = self.args, self.data["env"]
        env.update(device=self.dev.type, device_name=self.device_name, torch=torch.__version__,
                   transformers=transformers.__version__, python=platform.python_version(),
                   cpu_threads=torch.get_num_threads(), load_average=os.getloadavg()[0],
                   compile_backend=a.compile_backend)
        if self.dev.type == "cuda":
            props = torch.cuda.get_device_properties(self.dev)
            env.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                       multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
            self.peak = peak_flops(self.dev, "bf16")
            env["peak_source"] = "nanot5.hardware table (datasheet, dense bf16)"
            measured = cuda_matmul_tflops(self.dev)
            env["measured_matmul_tflops"] = measured / 1e12
            if not math.isfinite(self.peak):  # a card missing from the table: MFU of the measured matmul
                self.peak = measured
                env["peak_source"] = "measured 8192^3 bf16 matmul (card not in nanot5.hardware's table)"
        else:  # a CPU has no datasheet figure: measured, as nanot5.hardware.peak_flops does
            self.peak = measure_matmul_peak(torch.bfloat16, n=512 if a.smoke else 2048)
            env["peak_source"] = "measured bf16 matmul (nanot5.hardware.measure_matmul_peak)"
            env["measured_matmul_tflops"] = self.peak / 1e12
        env["peak_tflops_bf16"] = self.peak / 1e12
        print(f"{self.device_name}: torch {torch.__version__}, transformers {transformers.__version__}, "
              f"bf16 peak {self.peak / 1e12:.1f} TFLOP/s ({env['peak_source']}), measured matmul "
              f"{env['measured_matmul_tflops']:.1f} TFLOP/s", flush=True)

    # ------------------------------------------------------------------ checks
    def checks(self) -> None:
        a, dev = self.args, self.dev
        set_matmul_precision("fp32", dev)  # exact fp32 on the GPU: no TF32 in the references
        cuda = dev.type == "cuda"
        # the model's shapes with two layers per stack; long enough for several flex tiles on CUDA
        self.ccfg = T5Config.from_name(a.model, num_layers=2, num_decoder_layers=2,
                                       **({"vocab_size": a.vocab} if a.vocab else {}))
        B, S, T = (4, 256, 64) if cuda else (4, 45, 13)
        self.cbatch = padded_batch(self.ccfg, B, S, T, dev)
        self.chf = build_hf(self.ccfg, seed=1)  # CPU master of the check models
        runs = {
            "hf_twin": self.check_hf_twin,
            "chunked_vs_plain": self.check_chunked,
            "packed_vs_unpacked": self.check_packed,
            "flex_forward": self.check_flex_forward,
            "flex_grads": self.check_flex_grads,
            "compiled_vs_eager_step": lambda: self.check_compiled("eager"),
            "compiled_flex_vs_eager_step": lambda: self.check_compiled("flex"),
            "flex_packed": self.check_flex_packed,
        }
        need = {"cuda": {"flex_forward": 30, "flex_grads": 40, "compiled_vs_eager_step": 40,
                         "compiled_flex_vs_eager_step": 50, "flex_packed": 40},
                "cpu": {"flex_forward": 40, "flex_packed": 40}}[dev.type]
        # room for the speed variants that matter most: three uncompiled, ours per-block, HF whole-model
        reserve = self.later_need("train") + 3 * self.est[None] + self.est["block"] + self.est["whole"]
        wanted = a.checks.split(",")
        for name in CHECKS:
            rec = self.data["checks"][name] = {"status": "running"}
            reason = self.skip_reason(name) if name in wanted else "not selected (--checks)"
            keep = 0.0 if name in CRITICAL_CHECKS else reserve
            if reason is None and self.budget.left() - keep < need.get(name, 5):
                reason = f"budget: {self.budget.left():.0f} s left, needs ~{need.get(name, 5)} s" + (
                    f" and the speed sections ~{keep:.0f} s" if keep else "")
            if reason:
                rec.update(status="skip", reason=reason)
            else:
                t = time.perf_counter()
                try:
                    inject(self.args, name)
                    rec.update(runs[name]())
                except Exception as e:
                    rec.update(error_record(e))
                finally:
                    rec["seconds"] = round(time.perf_counter() - t, 2)
                    release(dev)
                if name.startswith("compiled") and rec["status"] != "error":  # mostly compiling two block graphs
                    self.est["block"] = rec["seconds"] * 1.3
            shown = {k: f"{v:.1e}" for k, v in rec.get("diffs", {}).items() if isinstance(v, float)}
            print(f"  {name:<28} {rec['status'].upper():<5} {shown or rec.get('reason') or rec.get('error', '')}",
                  flush=True)
            self.report.save()
        del self.cbatch, self.chf
        torch._dynamo.reset()  # the speed section compiles its own shapes
        release(dev)

    def skip_reason(self, name: str) -> str | None:
        cpu = self.dev.type == "cpu"
        if cpu and name in ("flex_grads", "compiled_flex_vs_eager_step"):
            return "FlexAttention has no backward on the CPU (torch raises NotImplementedError)"
        if cpu and name in ("flex_forward", "flex_packed") and not self.args.flex_cpu:
            return "compiling flex kernels takes ~30 s per shape on the CPU: --flex-cpu runs it"
        return None

    def ours(self, attention: str = "eager", train: bool = True) -> T5:
        return twin(self.chf, with_attention(self.ccfg, attention), self.dev).train(train)

    def check_hf_twin(self) -> dict:
        """Our model and transformers' with the same weights: logits and loss (fp32, padded batch)."""
        hf = copy.deepcopy(self.chf).to(self.dev).eval()
        hf.set_attn_implementation("eager")
        ours = self.ours(train=False)
        with torch.no_grad():
            ref, out = hf(**self.cbatch, use_cache=False), ours(**self.cbatch)
        diffs = {"logits": rel_max(out.logits, ref.logits), "loss": rel(out.loss.item(), ref.loss.item())}
        tol = {"logits": 1e-4 if self.dev.type == "cuda" else 1e-5, "loss": 1e-5}
        return dict(status=verdict(diffs, tol), diffs=diffs, tolerance=tol)

    def check_chunked(self) -> dict:
        """T5.forward(return_logits=False) (chunked lm_head + cross-entropy) == the plain path, several
        chunks and a remainder: loss, and every gradient (an upstream gradient of 2 reaches both)."""
        import nanot5.model as model_module

        plain, chunked = self.ours(), self.ours()
        ref = plain(**self.cbatch)
        rows = self.cbatch["labels"].numel() // 3 + 1  # three chunks, the last one shorter
        saved = model_module.LOSS_CHUNK_BYTES
        model_module.LOSS_CHUNK_BYTES = 4 * self.ccfg.vocab_size * rows
        try:
            out = chunked(**self.cbatch, return_logits=False)
        finally:
            model_module.LOSS_CHUNK_BYTES = saved
        (2.0 * ref.loss).backward()
        (2.0 * out.loss).backward()
        grads, worst = grad_diff(plain, chunked)
        diffs = {"loss": rel(out.loss.item(), ref.loss.item()), "grads": grads}
        tol = {"loss": 1e-5, "grads": 1e-5}
        status = verdict(diffs, tol) if out.logits is None else "fail"
        return dict(status=status, diffs=diffs, tolerance=tol, worst_grad=worst, chunk_rows=rows,
                    logits_none=out.logits is None)

    def check_packed(self) -> dict:
        """Packed rows (segment ids, eager attention) == each example alone: summed loss and gradients."""
        model = self.ours()
        batch, examples = packed_batch(self.ccfg, 4 if self.dev.type == "cuda" else 1, self.dev)
        n_tokens = int((batch["labels"] != -100).sum())
        packed = model(**batch).loss * n_tokens
        packed.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        alone = sum(model(x[None], labels=y[None]).loss * len(y) for x, y in examples)
        alone.backward()
        worst, name = 0.0, ""
        for n, p in model.named_parameters():
            d = rel_norm(grads[n], p.grad)
            if not d <= worst:
                worst, name = d, n
        diffs = {"loss": rel(packed.item(), alone.item()), "grads": worst}
        tol = {"loss": 1e-5, "grads": 1e-4 if self.dev.type == "cuda" else 1e-5}
        return dict(status=verdict(diffs, tol), diffs=diffs, tolerance=tol, worst_grad=name)

    def check_flex_forward(self) -> dict:
        """flex == eager without gradients (evaluation): encoder output (bidirectional, padded) and
        logits (decoder causal + padding, cross-attention to the padded encoder)."""
        eager, flex = self.ours(train=False), self.ours("flex", train=False)
        b = self.cbatch
        with torch.no_grad():
            h_ref = eager.encode(b["input_ids"], b["attention_mask"])
            h = flex.encode(b["input_ids"], b["attention_mask"])
            ref, out = eager(**b), flex(**b)
        diffs = {"encoder": rel_max(h, h_ref), "logits": rel_max(out.logits, ref.logits),
                 "loss": rel(out.loss.item(), ref.loss.item())}
        tol = {"encoder": 1e-4, "logits": 1e-4, "loss": 1e-5} if self.dev.type == "cuda" else \
            {"encoder": 1e-5, "logits": 1e-5, "loss": 1e-5}
        return dict(status=verdict(diffs, tol), diffs=diffs, tolerance=tol)

    def check_flex_grads(self) -> dict:
        """flex == eager in training: logits, loss and the gradient of every parameter, including both
        relative-bias tables (which must receive a nonzero gradient through the flex kernel)."""
        eager, flex = self.ours(), self.ours("flex")
        ref, out = eager(**self.cbatch), flex(**self.cbatch)
        ref.loss.backward()
        out.loss.backward()
        grads, worst = grad_diff(eager, flex)
        bias = {f"{s}_bias_grad_abs": float(getattr(flex, s).rel_bias.weight.grad.abs().sum())
                for s in ("encoder", "decoder")}
        diffs = {"logits": rel_max(out.logits, ref.logits), "loss": rel(out.loss.item(), ref.loss.item()),
                 "grads": grads,
                 "encoder_bias_grad": rel_norm(flex.encoder.rel_bias.weight.grad, eager.encoder.rel_bias.weight.grad),
                 "decoder_bias_grad": rel_norm(flex.decoder.rel_bias.weight.grad, eager.decoder.rel_bias.weight.grad)}
        tol = {"logits": 1e-4, "loss": 1e-5, "grads": 1e-4, "encoder_bias_grad": 1e-4, "decoder_bias_grad": 1e-4}
        status = verdict(diffs, tol) if all(v > 0 for v in bias.values()) else "fail"
        return dict(status=status, diffs=diffs, tolerance=tol, worst_grad=worst, **bias)

    def check_flex_packed(self) -> dict:
        """flex == eager on packed rows (segment block masks): logits at the target positions, loss, and
        (where flex has a backward) every gradient."""
        train = self.dev.type == "cuda"
        eager, flex = self.ours(train=train), self.ours("flex", train=train)
        batch, _ = packed_batch(self.ccfg, 4 if train else 1, self.dev)
        with torch.set_grad_enabled(train):
            ref, out = eager(**batch), flex(**batch)
        keep = batch["labels"] != -100
        diffs = {"logits": rel_max(out.logits[keep], ref.logits[keep]), "loss": rel(out.loss.item(), ref.loss.item())}
        tol = {"logits": 1e-4 if train else 1e-5, "loss": 1e-5}
        rec = {}
        if train:
            ref.loss.backward()
            out.loss.backward()
            diffs["grads"], rec["worst_grad"] = grad_diff(eager, flex)
            tol["grads"] = 1e-4
        return dict(status=verdict(diffs, tol), diffs=diffs, tolerance=tol, **rec)

    def check_compiled(self, attention: str) -> dict:
        """Two training steps (two micro-batches each, grad clipping, AdamWScale) of the eager model and
        of a per-block compiled copy (train.py's model.compile) with `attention`: the losses of both
        steps and the first step's gradients of every parameter."""
        a = self.args
        ref, other = self.ours(), self.ours(attention)
        compile_ours(other, "block", a.compile_backend)
        micro = split(self.cbatch, 2)
        out = {}
        for name, model in (("ref", ref), ("other", other)):
            opt = build_optimizer("adamwscale", param_groups(model, 0.0), lr=LR)
            losses = []
            for step in range(2):
                losses.append(float(accumulate_gradients(model, micro, contextlib.nullcontext())))
                if step == 0:
                    out[name + "_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                opt.step()
                opt.zero_grad(set_to_none=True)
            out[name] = losses
        worst, wname = 0.0, ""
        for n, g in out["ref_grads"].items():
            d = rel_norm(out["other_grads"][n], g)
            if not d <= worst:
                worst, wname = d, n
        diffs = {"loss": rel(out["other"][0], out["ref"][0]), "grads": worst,
                 "loss_step2": rel(out["other"][1], out["ref"][1])}
        tol = {"loss": 1e-5, "grads": 1e-4, "loss_step2": 1e-4}
        return dict(status=verdict(diffs, tol), diffs=diffs, tolerance=tol, worst_grad=wname,
                    backend=a.compile_backend, losses={"eager": out["ref"], "compiled": out["other"]})

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        a, dev = self.args, self.dev
        set_matmul_precision("bf16", dev)  # as train.py for precision=bf16 (TF32 for any fp32 matmul)
        torch.manual_seed(0)
        self.hf_master = build_hf(self.cfg, seed=0)  # every variant starts from these weights (CPU copy)
        self.batch = dense_batch(self.cfg, a.global_batch, a.input_len, a.target_len, dev)
        self.flops = flops_per_step(self.cfg, a.global_batch, a.input_len, a.target_len)
        self.tokens = a.global_batch * (a.input_len + a.target_len)
        names = [n for n in a.variants.split(",") if n]
        for name in VARIANTS:
            if name not in names:
                self.data["train"][name] = {"status": "skip", "reason": "not selected (--variants)"}
        for name in names:
            self.warm_variant(name)
        ready = [n for n in names if n in self.variants]
        for r in range(1, a.rounds):  # round 0 ran right after each warm-up
            ready = [n for n in ready if n in self.variants]  # a variant that failed a step leaves
            cost = sum(self.variants[n]["median"] * a.steps for n in ready) + 1.0
            if self.budget.left() - self.later_need("train") < cost:
                print(f"  alternating round {r}: skipped (budget)", flush=True)
                break
            for name in rotated(ready, r):
                self.time_variant(name)
            self.report.save()
        for name in [n for n in names if self.data["train"][n].get("status") == "ok"]:
            self.data["train"][name]["alternating_rounds"] = self.data["train"][name]["rounds"] - 1
        self.variants.clear()
        release(dev)

    def warm_variant(self, name: str) -> None:
        a, dev = self.args, self.dev
        family, attention, mode = VARIANTS[name]
        rec = self.data["train"][name] = {"status": "running", "family": family, "attention": attention,
                                          "compile": mode, "gates": list(GATES[name])}
        need = self.est[mode] + self.later_need("train") + sum(
            v["median"] * a.steps * (a.rounds - 1) for v in self.variants.values())
        if dev.type == "cpu" and attention == "flex":
            rec.update(status="skip", reason="FlexAttention has no backward on the CPU (training falls back to eager)")
        elif self.budget.left() < need:
            rec.update(status="skip", reason=f"budget: {self.budget.left():.0f} s left, needs ~{need:.0f} s")
        if rec["status"] == "skip":
            print(f"  {name:<20} skipped: {rec['reason']}", flush=True)
            self.report.save()
            return
        t_start = time.perf_counter()
        graphs0, breaks0 = dynamo_stats()
        try:
            inject(self.args, name)
            if family == "nanot5":
                model = twin(self.hf_master, with_attention(self.cfg, attention), dev).train()
                forward = compile_ours(model, mode, a.compile_backend)
            else:
                model = copy.deepcopy(self.hf_master).to(dev).train()
                model.set_attn_implementation(attention)
                forward = hf_forward(torch.compile(model, backend=a.compile_backend) if mode else model)
            opt = build_optimizer("adamwscale", param_groups(model, 0.0), lr=LR)
            micro = min(a.micro or a.global_batch, a.global_batch)
            oom = []
            while True:
                step = self.make_step(model, forward, opt, micro)
                try:
                    self.warm_up(step, model, opt, rec)
                    break
                except torch.cuda.OutOfMemoryError as e:  # halve outside the handler (frees the traceback)
                    oom.append(f"{micro}: {str(e).splitlines()[0][:200]}")
                opt.zero_grad(set_to_none=True)
                del step
                release(dev)
                if micro == 1:
                    raise RuntimeError("out of memory at micro-batch 1")
                micro //= 2
            graphs, breaks = dynamo_stats()
            new_breaks = [k.splitlines()[0][:200] for k in breaks if k not in breaks0]
            rec.update(micro_batch=micro, grad_acc=a.global_batch // micro, oom_tried=oom, times=[], rounds=0,
                       warmup_s=round(time.perf_counter() - t_start, 2), status="ok",
                       graphs_compiled=graphs - graphs0, graph_breaks=new_breaks[:5], graphs_compiled_while_timed=0)
            self.variants[name] = {"step": step, "median": math.nan}
            self.time_variant(name)  # round 0, so that a run cut short still has this variant's numbers
            if mode:  # the next variant compiled this way probably takes as long
                self.est[mode] = max(self.est[mode] * 0.5, rec["warmup_s"] * 1.2)
            print(f"  {name:<20} micro {micro:>3} x {rec['grad_acc']:<3} warm-up {rec['warmup_s']:6.1f} s  "
                  f"step {fmt(rec.get('step_s'), '.4f')} s  peak {fmt_mib(rec.get('peak_mib'))}  "
                  f"graphs {rec['graphs_compiled']}, new graph breaks {len(rec['graph_breaks'])}", flush=True)
        except Exception as e:
            rec.update(error_record(e), warmup_s=round(time.perf_counter() - t_start, 2))
            self.variants.pop(name, None)
            print(f"  {name:<20} ERROR {rec['error'][:300]}", flush=True)
            release(dev)
        self.report.save()

    def make_step(self, model, forward, opt, micro: int):
        """One optimizer step over the global batch in micro-batches of `micro` rows (train.py's step)."""
        batches = split(self.batch, micro)
        limit = self.args.simulate_oom_above
        if limit and micro > limit:
            def forward(*_, **__):
                raise torch.cuda.OutOfMemoryError(f"simulated: micro-batch {micro} > {limit} rows")

        def step():
            loss = accumulate_gradients(forward, batches, self.amp)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    def warm_up(self, step, model, opt, out: dict) -> None:
        """Untimed steps into `out`: the first compiles (the first completed step's loss, from the initial
        weights, is compared across variants), the last one measures peak memory once the optimizer state
        exists (CUDA; null elsewhere)."""
        out.update(peak_mib=None, step_mib=None)
        for i in range(self.args.warmup):
            last = i == self.args.warmup - 1
            cuda = self.dev.type == "cuda" and last
            if cuda:
                sync(self.dev)
                torch.cuda.reset_peak_memory_stats(self.dev)
                base = torch.cuda.memory_allocated(self.dev)
            t = time.perf_counter()
            loss = step()
            sync(self.dev)
            if "first_loss" not in out:  # an OOM retry after a completed step keeps that step's loss
                out.update(first_loss=float(loss), first_step_s=round(time.perf_counter() - t, 3))
            if cuda:
                transient = torch.cuda.max_memory_allocated(self.dev) - base
                out.update(step_mib=transient / 2**20, peak_mib=(transient + state_bytes(model, opt)) / 2**20)
        out["last_loss"] = float(loss)

    def time_variant(self, name: str) -> None:
        a, rec = self.args, self.data["train"][name]
        step = self.variants[name]["step"]
        graphs0 = dynamo_stats()[0]
        try:
            for _ in range(a.steps):
                sync(self.dev)
                t = time.perf_counter()
                step()
                sync(self.dev)
                rec["times"].append(time.perf_counter() - t)
        except Exception as e:  # keep what was timed; the variant leaves the rounds
            rec["round_error"] = error_record(e)["error"]
            self.variants.pop(name, None)
        rec["rounds"] += 1
        rec["graphs_compiled_while_timed"] += dynamo_stats()[0] - graphs0  # > 0: recompiling, slow numbers
        if rec["times"]:
            sec = statistics.median(rec["times"])
            if name in self.variants:
                self.variants[name]["median"] = sec
            rec.update(step_s=sec, step_s_min=min(rec["times"]), step_s_max=max(rec["times"]),
                       tokens_per_s=self.tokens / sec, tflops=self.flops / sec / 1e12, mfu=self.flops / sec / self.peak)

    # ------------------------------------------------------------------ optimizer
    def optimizer(self) -> None:
        from bench.optim import contenders

        a, dev, out = self.args, self.dev, self.data["optimizer"]
        torch.manual_seed(0)
        with torch.device(dev):
            model = T5(self.cfg)
        groups = param_groups(model, weight_decay=0.0)
        params = [p for g in groups for p in g["params"]]
        gen = torch.Generator(device=dev).manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=dev) * 1e-3
        keep = ("adamwscale", "torch-adamw-fused", "adamwscale-foreach", "torch-adamw-foreach")
        makers = {n: make for n, make in contenders(groups, params) if n in keep}
        times = {n: [] for n in makers}
        out.update(model=a.model, parameters=sum(p.numel() for p in params), tensors=len(params), results={})
        for r in range(a.opt_rounds):
            for n in rotated(list(makers), r):
                step = makers[n]()
                times[n] += time_steps(step, a.opt_steps, dev, time.perf_counter)
                del step
                release(dev)
            for n, ts in times.items():
                out["results"][n] = {"step_s": statistics.median(ts), "step_s_min": min(ts), "steps": len(ts)}
            self.report.save()
            if self.budget.left() < self.later_need("optimizer"):
                break
        res = out["results"]
        out["adamwscale_vs_torch_fused"] = res["adamwscale"]["step_s"] / res["torch-adamw-fused"]["step_s"]
        print("  " + ", ".join(f"{n} {r['step_s'] * 1e3:.2f} ms" for n, r in res.items()), flush=True)

    # ------------------------------------------------------------------ generation
    def generate(self) -> None:
        self.run_generation("greedy", 1, "generate")
        release(self.dev)

    def beam(self) -> None:
        if self.args.beams < 2:
            self.data["sections"]["beam"]["reason"] = "--beams < 2"
            return
        self.run_generation(f"beam{self.args.beams}", self.args.beams, "beam")
        release(self.dev)

    def run_generation(self, key: str, beams: int, section: str) -> None:
        a, dev = self.args, self.dev
        out = self.data["generate"][key] = {"num_beams": beams, "batch": a.gen_batch, "input_len": a.gen_input_len,
                                            "new_tokens": a.gen_new_tokens, "precision": "bf16"}
        hf_cpu = self.hf_master if self.hf_master is not None else build_hf(self.cfg, seed=0)
        hf = copy.deepcopy(hf_cpu).to(dev).eval()
        try:
            hf.set_attn_implementation("sdpa")  # HF's default where it has it
            out["hf_attention"] = "sdpa"
        except Exception as e:  # a transformers version without T5 sdpa: its default, say so
            out["hf_attention"] = f"{hf.config._attn_implementation} (sdpa: {type(e).__name__}: {e})"[:300]
        hf.generation_config.eos_token_id = None  # never stop early: exactly new_tokens tokens
        ours = twin(hf, with_attention(self.cfg, a.gen_attention), dev).eval()
        out["ours_attention"] = a.gen_attention
        n = a.gen_new_tokens

        def calls(ids, mask, tokens):
            return {"ours": lambda: ours.generate(ids, attention_mask=mask, max_new_tokens=tokens, eos_token_id=-1,
                                                  num_beams=beams),
                    "hf": lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                              use_cache=True, do_sample=False, num_beams=beams)[:, 1:]}

        # fp32 first (TF32 off): the same weights must give the same tokens. Our readable path (eager
        # attention; the flex checks cover flex) on a small batch, so nothing compiles here.
        set_matmul_precision("fp32", dev)
        small = ragged_ids(self.cfg, 2, 32, dev, seed=2)
        with torch.no_grad():
            reference = twin(hf, with_attention(self.cfg, "eager"), dev).eval()
            tokens_ours = reference.generate(*small, max_new_tokens=8, eos_token_id=-1, num_beams=beams)
            del reference
            tokens_hf = calls(*small, 8)["hf"]()
        out["fp32_identical"] = bool(torch.equal(tokens_ours, tokens_hf))
        set_matmul_precision("bf16", dev)
        ids, mask = ragged_ids(self.cfg, a.gen_batch, a.gen_input_len, dev, seed=0)
        runs = calls(ids, mask, n)
        with torch.no_grad(), self.amp:
            t = time.perf_counter()
            first = {k: f() for k, f in runs.items()}  # warm-up (flex compiles its encoder kernel here)
            out["warmup_s"] = round(time.perf_counter() - t, 2)
            same = first["ours"].shape == first["hf"].shape
            out["identical_rows_bf16"] = float((first["ours"] == first["hf"]).all(1).float().mean()) if same else 0.0
            times = {k: [] for k in runs}
            for r in range(a.gen_rounds):
                for k in rotated(list(runs), r):
                    sync(dev)
                    t = time.perf_counter()
                    runs[k]()
                    sync(dev)
                    times[k].append(time.perf_counter() - t)
                if self.budget.left() < self.later_need(section):
                    break
        tokens = first["ours"].shape[0] * n
        for k, ts in times.items():
            out[k] = {"call_s": statistics.median(ts), "call_s_min": min(ts), "calls": len(ts),
                      "tokens_per_s": tokens / statistics.median(ts)}
        out["ours_vs_hf"] = out["ours"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
        out["valid"] = out["fp32_identical"]
        print(f"  {key}: ours {out['ours']['tokens_per_s']:.0f} tok/s, hf {out['hf']['tokens_per_s']:.0f} tok/s "
              f"({out['ours_vs_hf']:.2f}x); fp32 tokens identical: {out['fp32_identical']}", flush=True)

    # ------------------------------------------------------------------ summary
    def summary(self) -> None:
        """Validity of each variant, the projection and the targets (only this run's own numbers)."""
        self.data["projection"], self.data["targets"] = summarize(self.data, self.device_name)


def summarize(data: dict, device_name: str) -> tuple[dict, list]:
    """Mark each timed variant valid or not (its checks, its first loss), then the recipe projection and
    the issue's targets from the valid ones. Pure function of the report: everything compared was
    measured in this run, on this device."""
    checks, train = data["checks"], data["train"]
    # the first step's loss from the initial weights: ours_eager's (the readable path), else the median
    losses = [r["first_loss"] for r in train.values() if r.get("status") == "ok" and r.get("first_loss") is not None]
    ref = train.get("ours_eager", {}).get("first_loss")
    if ref is None and losses:
        ref, data["reference_first_loss"] = statistics.median(losses), "median of the variants (no ours_eager)"
    for name, rec in train.items():
        if rec.get("status") != "ok" or "step_s" not in rec:
            continue
        why = [f"{c}: {checks.get(c, {}).get('status', 'missing')}" for c in GATES.get(name, ())
               if checks.get(c, {}).get("status") != "pass"]
        if rec.get("first_loss") is None or not rel(rec["first_loss"], ref) <= FIRST_LOSS_TOL:
            why.append(f"first-step loss {rec.get('first_loss')} differs from the reference {ref} "
                       f"by > {FIRST_LOSS_TOL}")
        if rec.get("graphs_compiled_while_timed"):
            why.append(f"torch.compile built {rec['graphs_compiled_while_timed']} graph(s) during timed steps")
        rec["valid"], rec["invalid_because"] = not why, why
    valid = {n: r for n, r in train.items() if r.get("valid")}
    ours = {n: r for n, r in valid.items() if n.startswith("ours")}
    hf_compiled = {n: r for n, r in valid.items() if n.startswith("hf") and r.get("compile")}
    best = min(ours, key=lambda n: ours[n]["step_s"]) if ours else None
    peer = min(hf_compiled, key=lambda n: hf_compiled[n]["step_s"]) if hf_compiled else None
    st = data["settings"]
    gpu = data["env"].get("device") == "cuda"
    recipe = (st.get("model") in ("t5-v1_1-base", "nanot5-base") and st.get("input_len") == 512
              and st.get("target_len") == 114 and st.get("global_batch") == 128)
    proj = {"recipe_steps": RECIPE_STEPS, "device": device_name, "comparable": gpu and recipe,
            "nanoT5_a100_step_s": NANOT5_A100_STEP_S, "nanoT5_a100_hours": RECIPE_STEPS * NANOT5_A100_STEP_S / 3600}
    if not proj["comparable"]:
        proj["note"] = ("not comparable with nanoT5's A100 time: the recipe is T5-base, 512/114 tokens, batch 128 "
                        "on a GPU; these hours are for this run's model, shapes and device")
    if best:
        s = ours[best]["step_s"]
        proj.update(best_variant=best, step_s=s, hours=RECIPE_STEPS * s / 3600,
                    speedup_vs_nanoT5_a100=NANOT5_A100_STEP_S / s)
    if peer:
        proj.update(hf_compiled_variant=peer, hf_hours=RECIPE_STEPS * hf_compiled[peer]["step_s"] / 3600)
    hopper = re.search(r"H100|H200", device_name) is not None
    applies = gpu and recipe  # the issue's targets are for T5-base at the recipe's settings on a GPU
    why_not = "" if applies else "applies to T5-base at 512/114, batch 128, on a GPU"
    targets = []

    def target(name, goal, value, ok, applies, note=""):
        status = ("met" if ok else "not met") if applies and value is not None else \
            ("n/a" if not applies else "not measured")
        targets.append({"name": name, "target": goal, "value": value, "status": status, "note": note})

    mfu = ours[best].get("mfu") if best else None
    mfu = mfu if mfu is not None and math.isfinite(mfu) else None
    target("mfu", f">= {TARGET_MFU:.0%} MFU (T5-base step, H100/H200-class)", mfu,
           mfu is not None and mfu >= TARGET_MFU, applies and hopper,
           why_not or ("" if hopper else "applies to H100/H200-class GPUs only"))
    ratio = hf_compiled[peer]["step_s"] / ours[best]["step_s"] if best and peer else None
    target("vs_hf_compiled", f">= {TARGET_VS_HF_COMPILED}x the HF model compiled", ratio,
           ratio is not None and ratio >= TARGET_VS_HF_COMPILED, applies,
           why_not or (f"{best} vs {peer}" if best and peer else ""))
    mem = (ours[best].get("peak_mib"), hf_compiled[peer].get("peak_mib")) if best and peer else (None, None)
    note = ""
    if best and peer:
        note = (f"{best} micro-batch {ours[best]['micro_batch']} vs {peer} micro-batch "
                f"{hf_compiled[peer]['micro_batch']}")
    target("memory_below_hf", "peak memory below the HF model's (the compiled peer)",
           None if None in mem else mem[0] / mem[1], None not in mem and mem[0] < mem[1], applies,
           why_not or note)
    return proj, targets


def ragged_ids(cfg: T5Config, B: int, S: int, device, seed: int):
    """Inputs as in batched prediction: rows padded to the longest (bench/generate.py's layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, B):
        mask[i, S - i * S // (2 * B):] = 0
    return ids.masked_fill(mask == 0, cfg.pad_token_id).to(device), mask.to(device)


def cuda_matmul_tflops(device, n: int = 8192, reps: int = 10) -> float:
    """Achieved FLOP/s of an n^3 bf16 matmul on random data (after a warm-up), timed with CUDA events."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3)


# ----------------------------------------------------------------------------- printing
def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_mib(x) -> str:
    return "-" if x is None else f"{x / 1024:.1f} GiB"


def print_tables(data: dict) -> None:
    env, st = data["env"], data["settings"]
    print(f"\n==== bench/gpu.py on {env.get('device_name', '?')} ({data['mode']}), torch {env.get('torch')}, "
          f"{data['elapsed_s']:.0f} s ====")
    print("\ncorrectness on the device (fp32):")
    for name, rec in data["checks"].items():
        diffs = "  ".join(f"{k} {fmt(v, '.1e')}<={fmt(rec.get('tolerance', {}).get(k), '.0e')}"
                          for k, v in rec.get("diffs", {}).items())
        print(f"  {name:<28} {rec.get('status', '?').upper():<5} {diffs or rec.get('reason') or rec.get('error', '')}")
    if st:
        print(f"\ntraining step: {st['model']}, {st['input_len']}/{st['target_len']} tokens, bf16 autocast, global "
              f"batch {st['global_batch']}, {st['optimizer']}; MFU of {env.get('peak_tflops_bf16', 0):.1f} TFLOP/s")
    print(f"  {'variant':<20} {'micro x acc':>11} {'warm-up':>8} {'s/step':>8} {'tokens/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak mem':>9}  valid")
    for name, r in data["train"].items():
        if r.get("status") != "ok":
            print(f"  {name:<20} {r.get('status', '?')}: {r.get('reason') or r.get('error', '')[:100]}")
            continue
        valid = "yes" if r.get("valid") else "NO: " + "; ".join(r.get("invalid_because", []))[:80]
        print(f"  {name:<20} {r['micro_batch']:>5} x {r['grad_acc']:<3} {r['warmup_s']:>7.1f}s "
              f"{fmt(r.get('step_s'), '8.4f'):>8} {fmt(r.get('tokens_per_s'), '9.0f'):>9} "
              f"{fmt(r.get('tflops'), '8.3g'):>8} {fmt(r.get('mfu'), '6.1%'):>6} "
              f"{fmt_mib(r.get('peak_mib')):>9}  {valid}")
    opt = data["optimizer"].get("results")
    if opt:
        print(f"\noptimizer step alone ({data['optimizer']['model']}, "
              f"{data['optimizer']['parameters'] / 1e6:.1f}M parameters):")
        for n, r in opt.items():
            print(f"  {n:<22} {r['step_s'] * 1e3:8.2f} ms (min {r['step_s_min'] * 1e3:.2f})")
        print(f"  adamwscale / torch fused AdamW: {fmt(data['optimizer'].get('adamwscale_vs_torch_fused'), '.2f')}x")
    for key, g in data["generate"].items():
        if "ours" in g:
            print(f"\ngeneration {key}: batch {g['batch']} x {g['input_len']} input tokens, {g['new_tokens']} new, "
                  f"bf16: ours ({g['ours_attention']}) {g['ours']['tokens_per_s']:.0f} tok/s, "
                  f"HF {g['hf']['tokens_per_s']:.0f} "
                  f"tok/s = {g['ours_vs_hf']:.2f}x; fp32 tokens identical {g['fp32_identical']}, bf16 identical rows "
                  f"{g['identical_rows_bf16']:.0%}")
    p = data["projection"]
    if p:
        print(f"\nnanoT5 recipe ({p['recipe_steps']} steps): nanoT5 on one A100 {p['nanoT5_a100_step_s']} s/step = "
              f"{p['nanoT5_a100_hours']:.1f} h")
        if "step_s" in p:
            vs = f"{p['speedup_vs_nanoT5_a100']:.2f}x nanoT5's A100" if p["comparable"] else p["note"]
            print(f"  this run, {p['best_variant']}: {p['step_s']:.3f} s/step = {p['hours']:.1f} h ({vs})")
        if "hf_hours" in p:
            print(f"  this run, {p['hf_compiled_variant']}: {p['hf_hours']:.1f} h")
    if data["targets"]:
        print("\ntargets (issue 14):")
        for t in data["targets"]:
            print(f"  {t['target']:<58} {fmt(t['value'], '.3f'):>8}  {t['status'].upper()}  {t['note']}")
    skipped = {n: s.get("reason") or s.get("error") for n, s in data["sections"].items() if s.get("status") != "done"}
    if skipped:
        print(f"\nsections not done: {skipped}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # read when CUDA first allocates: fewer fragmentation OOMs while models of different sizes alternate
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parse_args(argv)
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per shape, as training sees
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, key):  # many variants share Block.forward's code object
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
    GPUBench(args, argv).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
