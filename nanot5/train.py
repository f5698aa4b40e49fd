"""The one training loop. Pre-training (mode pt) and fine-tuning (mode ft) differ by config only.

    nanot5 pretrain [preset=nanot5-base] [key=value ...]
    nanot5 finetune [preset=sni] [key=value ...]

`train(cfg)` reads top to bottom (nanochat-style, with a `last_step` flag):

    run = setup(cfg)                                   # run folder, model, optimizer, data, resume
    loop:  evaluate? -> checkpoint? -> stop? -> train_step(run) -> log?
    finish(run)                                        # final/ first, then the extras

Ordinary steps never synchronise with the host (no .item(), no bool() of a tensor): the loss, the
gradient norm and a non-finite flag stay on the device and are read on logging, evaluation and
checkpoint steps only. A non-finite step stops the run there, before anything is saved, and the last
good checkpoint is kept; `optim.skip_nonfinite=true` instead skips such steps (one sync per step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nanot5 import distributed, faults
from nanot5.build import (
    Data,
    autocast_context,
    build_model,
    build_tokenizer,
    model_config,
    set_matmul_precision,
    to_device,
)
from nanot5.checkpoint import (
    DCP,
    ShardedSave,
    load_checkpoint,
    load_latest,
    read_sharded,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nanot5.config import (
    Config,
    ConfigError,
    check_warmup,
    config_from_dict,
    format_keys,
    load_config,
)
from nanot5.errors import CheckpointError, NanoT5Error
from nanot5.fileio import atomic_write_text
from nanot5.log import info, warn
from nanot5.model import T5, flops_per_step
from nanot5.rundir import RunDir, outputs_in
from nanot5.tracking import MetricsLogger, Progress, plot_losses


class NonFiniteError(NanoT5Error):
    """The loss or the gradient became inf/NaN (too high a learning rate, fp16 overflow, bad data)."""


@dataclass
class Run:
    """Everything a training run holds. `setup` builds it; the loop functions advance it."""

    cfg: Config
    env: distributed.DistEnv
    rundir: RunDir
    model: T5  # the unwrapped model (state dicts, saving, evaluation)
    train_model: torch.nn.Module  # what the step calls: the model, or its DDP/FSDP wrapper
    strategy: str  # single | ddp | fsdp
    optimizer: torch.optim.Optimizer
    lr_at: Any  # step -> learning rate
    data: Data
    tokenizer: Any
    amp: Any  # autocast context
    scaler: Any  # GradScaler for fp16, else None
    logger: MetricsLogger | None
    progress: Progress
    total_steps: int
    micro_batch: int  # rows per micro-batch on this rank
    step: int = 0
    tokens: int = 0
    resume_step: int | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best evaluation (checkpoint.best_metric)
    evals_since_best: int = 0
    early_stopped: bool = False
    pending_save: ShardedSave | None = None  # a sharded checkpoint still being written (checkpoint.async_save)
    # device-side accumulators since the last log line: no host sync on ordinary steps
    window_loss: torch.Tensor | None = None
    window_steps: int = 0
    window_skipped: int = 0
    bad_step: torch.Tensor | None = None  # first step with a non-finite loss/gradient, -1 if none
    grad_norm: torch.Tensor | None = None
    lr: float = 0.0
    tokens_per_step: int = 0
    model_flops: float | None = None
    peak_flops: float = math.nan
    t_start: float = field(default_factory=time.time)
    t_window: float = field(default_factory=time.time)
    train_time: float = 0.0

    @property
    def dir(self) -> Path:
        return self.rundir.path

    @property
    def device(self) -> torch.device:
        return self.env.device


# ----------------------------------------------------------------- setup
def setup(cfg: Config) -> Run:
    """Check the process layout, open the run folder, build everything, resume if asked."""
    from nanot5.optim import build_optimizer, lr_schedule, param_groups
    from nanot5.runtime import tune_cpu_runtime

    tune_cpu_runtime()
    env = distributed.init(cfg.device)
    set_matmul_precision(cfg.precision, env.device)
    micro = micro_batch_size(cfg, env.world_size)
    path = distributed.broadcast_object(str(RunDir.resolve(cfg.run.dir)) if env.is_main else None)
    rundir = RunDir.open(path, resume=cfg.resume, overwrite=cfg.run.overwrite, is_main=env.is_main)
    try:
        resume = find_resume(cfg, rundir, env)
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer(cfg)
        model = build_model(cfg, len(tokenizer)).to(env.device)
        if cfg.model.compile:  # per block: one compiled graph serves every block of a stack
            for block in (*model.encoder.blocks, *model.decoder.blocks):
                block.compile()
        strategy = cfg.distributed.strategy if env.enabled else "single"
        if strategy == "fsdp" and cfg.eval.generate:
            raise ConfigError("eval.generate=true needs whole weights on one rank: not with distributed.strategy=fsdp;"
                              " generate after training with `nanot5 predict model=RUN_DIR`")
        train_model = distributed.wrap_model(model, strategy, env, cfg.precision) if env.enabled else model
        if cfg.checkpoint.async_save and strategy != "fsdp" and env.is_main:
            warn("checkpoint.async_save=true applies to sharded checkpoints (distributed.strategy=fsdp on several "
                 "processes); this run saves synchronously")
        optimizer = build_optimizer(cfg.optim.name, param_groups(model, cfg.optim.weight_decay),
                                    lr=cfg.optim.base_lr, weight_decay=cfg.optim.weight_decay)
        # a resumed stream keeps the reader layout it was saved with, whatever the process count now
        saved_readers = None
        if resume is not None and cfg.mode == "pt":
            saved_readers = resume["trainer"]["ranks"][0]["data"]["config"]["num_readers"]
        data = Data(cfg, tokenizer, env, micro, num_readers=saved_readers,
                    decoder_start_id=model.config.decoder_start_token_id)
        steps = total_steps(cfg, data)
        check_warmup(cfg.optim.warmup_steps, steps)
        lr_at = lr_schedule(cfg.optim.lr_scheduler, base_lr=cfg.optim.base_lr,
                            warmup_steps=cfg.optim.warmup_steps, total_steps=steps,
                            final_cosine=cfg.optim.final_cosine)
        run = Run(cfg=cfg, env=env, rundir=rundir, model=model, train_model=train_model, strategy=strategy,
                  optimizer=optimizer, lr_at=lr_at, data=data, tokenizer=tokenizer,
                  amp=autocast_context(cfg.precision, env.device),
                  scaler=torch.amp.GradScaler(env.device.type) if cfg.precision == "fp16" else None,
                  logger=None, progress=None, total_steps=steps, micro_batch=micro)  # type: ignore[arg-type]
        run.window_loss = torch.zeros((), device=env.device)
        run.bad_step = torch.full((), -1, dtype=torch.long, device=env.device)
        if resume is not None:
            restore(run, resume)
        print_summary(cfg, model, tokenizer, env, rundir.path, micro, steps)
        if env.is_main:
            remove_stale_temporaries(rundir.checkpoints)
            atomic_write_text(rundir.path / "config.yaml", cfg.to_yaml())
            run.logger = MetricsLogger(rundir.path, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                       wandb_project=cfg.logging.wandb_project, config=cfg.to_dict(),
                                       resume_step=run.step if resume is not None else None,
                                       fresh=resume is None)
            from nanot5.hardware import peak_flops

            run.peak_flops = peak_flops(env.device, cfg.precision, cfg.logging.peak_tflops)
        run.progress = Progress(steps, run.step, cfg.logging.progress, enabled=env.is_main)
        return run
    except BaseException:
        rundir.close()
        raise


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Rows per micro-batch on each rank: batch_size / (grad_acc * world_size), exactly."""
    micro = cfg.optim.batch_size // cfg.optim.grad_acc
    if micro % world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} (global) / optim.grad_acc={cfg.optim.grad_acc}"
                          f" = {micro} is not divisible by the {world_size} processes")
    return micro // world_size


def total_steps(cfg: Config, data: Data) -> int:
    if cfg.optim.epochs > 0:
        if data.steps_per_epoch is None:
            raise ConfigError("optim.epochs needs a finite data set; for streamed pre-training set "
                              "optim.total_steps and optim.epochs=-1")
        return cfg.optim.epochs * data.steps_per_epoch
    return cfg.optim.total_steps


def find_resume(cfg: Config, rundir: RunDir, env: distributed.DistEnv) -> dict[str, Any] | None:
    """The checkpoint to continue from (resume=auto | PATH), checked against this config; None: start fresh.

    resume=auto with no checkpoint starts from step 0 only if the folder holds nothing but the outputs of
    a run that never saved one (then its metrics.jsonl is rewritten, and we say so); a folder with a
    summary or final/ but no usable checkpoint is refused rather than silently started over.
    """
    if not cfg.resume:
        return None
    # a sharded checkpoint's tensors are read later, by restore(), each rank only its own shards
    if cfg.resume != "auto":
        ckpt = load_checkpoint(Path(cfg.resume), weights=False)
    else:
        ckpt = load_latest(rundir.checkpoints, weights=False)
        if ckpt is None:
            finished = [n for n in ("final", "summary.json") if (rundir.path / n).exists()]
            if finished:
                raise CheckpointError(f"resume=auto: {rundir.path} holds a run's outputs ({', '.join(finished)}) "
                                      "but no checkpoint to continue from; choose a new run.dir")
            if env.is_main and outputs_in(rundir.path):
                info(f"resume=auto: no checkpoint in {rundir.checkpoints}; starting this run from step 0 again")
            return None
    check_compatible(cfg, ckpt)
    return ckpt


def check_compatible(cfg: Config, resume: dict[str, Any]) -> None:
    """The checkpoint must come from the same model, data and optimizer setup."""
    saved = config_from_dict(yaml.safe_load(resume["config_yaml"]))
    for key in ("mode", "model.name", "model.overwrite", "tokenizer.name", "data.source", "data.input_length",
                "data.mlm_probability", "data.mean_noise_span_length", "data.objective", "data.ul2_mixture",
                "data.ul2_mode_tokens", "optim.name", "optim.batch_size",
                "optim.grad_acc", "seed"):
        a, b = _get(saved, key), _get(cfg, key)
        if a != b:
            raise CheckpointError(f"checkpoint {resume['path']} is incompatible with this run: {key} was {a!r}, "
                                  f"now {b!r} (start a new run.dir, or resume with the same setting)")


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def restore(run: Run, ckpt: dict[str, Any]) -> None:
    """Weights, optimizer, step counters, data position and RNG from a checkpoint, written by any number of
    processes: a sharded (DCP) checkpoint is resharded to this run's layout (each FSDP rank reads its own
    shards; one process or DDP reads whole tensors), a single-file one is loaded whole and sharded here."""
    if ckpt["format"] == DCP:
        distributed.load_sharded_state_dicts(run.model, run.optimizer, lambda t: read_sharded(ckpt["path"], t),
                                             ckpt["trainer"]["optimizer"])
    else:
        distributed.load_full_state_dicts(run.model, run.optimizer, ckpt["model"], ckpt["optimizer"], run.strategy)
    trainer = ckpt["trainer"]
    run.step, run.tokens = trainer["step"], trainer["tokens"]
    run.last_eval = trainer.get("last_eval", {})
    run.best, run.evals_since_best = trainer.get("best"), trainer.get("evals_since_best", 0)
    run.window_loss.fill_(trainer.get("window_loss", 0.0))
    run.window_steps, run.window_skipped = trainer.get("window_steps", 0), trainer.get("window_skipped", 0)
    ranks = trainer["ranks"]
    if len(ranks) == run.env.world_size:
        run.data.load_state_dict(ranks[run.env.rank]["data"])
        set_rng_state(ranks[run.env.rank]["rng"])
    else:
        run.data.load_resharded([r["data"] for r in ranks])
        set_rng_state(ranks[0]["rng"])
    run.resume_step = run.step
    info(f"resumed from {ckpt['path']} at step {run.step}")


def print_summary(cfg: Config, model: T5 | None, tokenizer, env, run_dir: Path, micro: int, steps: int | str,
                  num_parameters: int | None = None) -> None:
    """The resolved run in a few lines, printed at the start (and by --dry-run)."""
    n = num_parameters if num_parameters is not None else model.num_parameters()
    mc = model.config if model is not None else model_config(cfg)
    tok = f"{tokenizer.name} ({len(tokenizer)} tokens)" if tokenizer is not None else cfg.tokenizer.name or "model's own"
    lengths = f"input {cfg.data.input_length}" if cfg.mode == "pt" else \
        f"input <= {cfg.data.max_seq_len}, target <= {cfg.data.max_target_len}"
    o = cfg.optim
    lines = [
        f"model      {cfg.model.name}{' (random init)' if cfg.model.random_init else ''}: {n / 1e6:.1f}M parameters "
        f"(d_model {mc.d_model}, {mc.num_layers}+{mc.num_decoder_layers} layers, vocab {mc.vocab_size})",
        f"tokenizer  {tok}",
        f"data       {cfg.data.source}" + (f" (validation: {cfg.data.validation_source})"
                                            if cfg.data.validation_source else "") + f", {lengths}",
        f"batch      {o.batch_size} global = {micro} rows x {o.grad_acc} grad_acc x {env.world_size} process(es)",
        f"steps      {steps}, {o.name} lr {o.base_lr:g} ({o.lr_scheduler}, warmup {o.warmup_steps})",
        f"precision  {cfg.precision} on {env.device}" + (" (compiled)" if cfg.model.compile else ""),
        f"run dir    {run_dir}",
    ]
    info("\n  ".join(["run:"] + lines))


# ------------------------------------------------------------------ step
def accumulate_gradients(forward, micro_batches: list[dict[str, torch.Tensor]], amp, scaler=None,
                         no_sync=None) -> torch.Tensor:
    """Forward+backward over the micro-batches of one optimizer step; returns the mean loss (detached).

    Each micro-batch loss is divided by their number, so the summed gradients equal those of one
    big batch (exactly when every micro-batch has as many target tokens, as in pre-training).
    Under DDP, `no_sync` skips the gradient all-reduce on all but the last micro-batch.
    """
    n = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0]["input_ids"].device)
    for i, batch in enumerate(micro_batches):
        with (no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()), amp:
            loss = forward(**batch, return_logits=False).loss / n  # chunked: no full (B, T, V) logits
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    return total


def train_step(run: Run) -> None:
    """One optimizer step over grad_acc micro-batches. No host synchronisation unless skip_nonfinite/fp16."""
    cfg, t0 = run.cfg, time.time()
    run.lr = run.lr_at(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    batches = [to_device(run.data.next_batch(), run.device) for _ in range(cfg.optim.grad_acc)]
    run.tokens_per_step = sum(b["input_ids"].numel() + b["labels"].numel() for b in batches) * run.env.world_size
    if run.model_flops is None:
        shape = (batches[0]["input_ids"].shape[1], batches[0]["labels"].shape[1])
        run.model_flops = flops_per_step(run.model.config, cfg.optim.batch_size, *shape)
    no_sync = run.train_model.no_sync if run.strategy == "ddp" else None
    loss = accumulate_gradients(run.train_model, batches, run.amp, run.scaler, no_sync)
    faults.point("step")
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    run.grad_norm = (torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
                     if cfg.optim.grad_clip > 0 else None)
    bad = ~torch.isfinite(loss)
    if run.grad_norm is not None:
        bad |= ~torch.isfinite(distributed.local_tensor(run.grad_norm))
    if run.scaler is not None:  # fp16: the scaler skips non-finite steps and lowers its scale
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.window_loss += torch.where(bad, 0.0, loss)
    elif cfg.optim.skip_nonfinite:  # one host sync per step, by request
        if bool(distributed.any_rank(bool(bad), run.device)):
            run.window_skipped += 1
        else:
            run.optimizer.step()
            run.window_loss += loss
    else:  # remember the first bad step on the device; it is read before anything is logged or saved
        run.bad_step = torch.where(bad & (run.bad_step < 0), run.step + 1, run.bad_step)
        run.optimizer.step()
        run.window_loss += loss
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens += run.tokens_per_step
    run.window_steps += 1
    run.train_time += time.time() - t0


def check_finite(run: Run) -> None:
    """Stop with a clear error if any step since the last check had a non-finite loss or gradient (a sync)."""
    if run.scaler is not None or run.cfg.optim.skip_nonfinite:
        return
    bad = distributed.all_reduce_max(run.bad_step.clone())
    if int(bad) >= 0:
        raise NonFiniteError(
            f"non-finite loss or gradient at step {int(bad)}; stopping before anything is saved. The last good "
            f"checkpoint in {run.rundir.checkpoints} is kept; lower optim.base_lr, use precision=fp32, or set "
            "optim.skip_nonfinite=true to skip such steps")


def log_step(run: Run) -> None:
    """The logging step: read the window's loss, gradient norm, throughput (host syncs happen here)."""
    check_finite(run)
    n = max(1, run.window_steps - run.window_skipped)
    loss = float(distributed.all_reduce_sum(run.window_loss.clone())) / run.env.world_size / n
    dt = (time.time() - run.t_window) / max(1, run.window_steps)
    event = {"kind": "train", "step": run.step, "loss": loss, "lr": run.lr, "seconds_per_step": dt,
             "tokens_per_s": run.tokens_per_step / dt, "tokens": run.tokens}
    if run.grad_norm is not None:
        event["grad_l2"] = float(distributed.full_tensor(run.grad_norm))
    norms = [distributed.full_tensor(p.detach()).float().norm() for p in run.model.parameters()]
    event["weights_l2"] = float(torch.linalg.vector_norm(torch.stack(norms)))
    if run.model_flops and math.isfinite(run.peak_flops):
        event["mfu"] = run.model_flops / dt / run.peak_flops
    if run.window_skipped:
        event["skipped_steps"] = run.window_skipped
    if run.logger:
        run.logger.log(event)
    run.progress.update(run.step, {"loss": f"{loss:.4f}", "lr": f"{run.lr:.2e}",
                                   "tok/s": f"{event['tokens_per_s']:.0f}"})
    run.window_loss.zero_()
    run.window_steps = run.window_skipped = 0
    run.t_window = time.time()


# ------------------------------------------------------- eval/checkpoint
def evaluate(run: Run) -> None:
    """Held-out loss/accuracy at this step; fine-tuning with eval.generate also generates for the validation set
    and scores it. Logged; then the best model (checkpoint.best_metric) and early stopping are updated."""
    from nanot5.evaluate import heldout_metrics, predict

    check_finite(run)
    cfg = run.cfg
    result: dict[str, Any] = {"step": run.step}
    run.model.eval()
    try:
        if run.data.eval_loader is not None:
            held = heldout_metrics(run.model, run.data.eval_loader, amp=run.amp, device=run.device)
            if cfg.mode == "ft":  # in fine-tuning `accuracy` is the generation metric (eval.metrics)
                held["token_accuracy"] = held.pop("accuracy")
            result.update(held)
        if cfg.mode == "ft" and cfg.eval.generate and run.data.sets.validation_records:
            records = run.data.sets.validation_records[:cfg.eval.max_examples or None]
            scores = None
            if run.env.is_main:  # the other ranks wait: generation lengths differ, no collectives inside
                scores = predict(run.model, run.tokenizer, cfg, records, device=run.device, amp=run.amp,
                                 sni=run.data.sets.sni)
                scores = {k: v for k, v in scores.items() if "_for_" not in k}  # overall numbers only
            result.update(distributed.broadcast_object(scores))
    finally:
        run.model.train()
    run.last_eval = result
    if run.logger:
        run.logger.log({"kind": "eval", **result})
    shown = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in ("step", "tokens"))
    info(f"[eval] step {run.step} | {shown}")
    track_best(run)


def track_best(run: Run) -> None:
    """Keep the best model so far by checkpoint.best_metric in run.dir/best (HF format), count evaluations
    without improvement for early stopping."""
    name = run.cfg.checkpoint.best_metric
    if not name or name not in run.last_eval:
        return
    value = run.last_eval[name]
    if run.best is not None and not (value < run.best["value"] if name == "loss" else value > run.best["value"]):
        run.evals_since_best += 1
        patience = run.cfg.optim.early_stopping_patience
        if patience and run.evals_since_best >= patience:
            run.early_stopped = True
            info(f"early stopping: {name} has not improved on {run.best['value']:.4f} (step {run.best['step']}) "
                 f"for {patience} evaluations")
        return
    run.best, run.evals_since_best = {"metric": name, "value": value, "step": run.step}, 0
    model = distributed.unsharded_copy(run.model, run.strategy)  # a collective under FSDP
    if run.env.is_main:
        from nanot5.evaluate import write_hf_dir
        from nanot5.fileio import replace_dir

        tmp = run.dir / f".best.tmp-{os.getpid()}"
        write_hf_dir(model, run.tokenizer, tmp, source=f"step {run.step}, {name} {value:.4f}")
        replace_dir(tmp, run.dir / "best")
        info(f"new best {name} {value:.4f} at step {run.step} -> {run.dir / 'best'}")


def save(run: Run) -> None:
    """A checkpoint of everything needed to continue exactly: every rank's data position and RNG, the weights
    and the optimizer. Under FSDP each rank writes its own shards (torch.distributed.checkpoint; in the
    background with checkpoint.async_save); otherwise the weights are whole and rank 0 writes them."""
    check_finite(run)
    ranks = distributed.all_gather_objects({"data": run.data.state_dict(), "rng": rng_state()})
    state = {"step": run.step, "tokens": run.tokens, "ranks": ranks, "last_eval": run.last_eval,
             "best": run.best, "evals_since_best": run.evals_since_best,
             "window_loss": float(run.window_loss), "window_steps": run.window_steps,
             "window_skipped": run.window_skipped}
    if run.strategy == "fsdp":
        save_sharded(run, state)
        return
    model_state, optim_state = distributed.full_state_dicts(run.model, run.optimizer, run.strategy)
    if run.env.is_main:
        path = save_checkpoint(run.rundir.checkpoints, run.step, model_state=model_state,
                               optimizer_state=optim_state, trainer_state=state, config_yaml=run.cfg.to_yaml(),
                               keep=run.cfg.checkpoint.keep, run_id=run.rundir.run_id)
        info(f"saved checkpoint {path}")
    distributed.barrier()


def save_sharded(run: Run, trainer_state: dict[str, Any]) -> None:
    """The FSDP checkpoint: shards via DCP, trainer.pt (with the optimizer's host values) by rank 0. With
    checkpoint.async_save the shards are written in the background and `poll_save` puts the folder in
    place once they are all on disk; the previous background save is completed first."""
    finish_pending_save(run)
    tensors, optimizer_host = distributed.sharded_state_dicts(run.model, run.optimizer)
    background = run.cfg.checkpoint.async_save
    pending = ShardedSave.start(run.rundir.checkpoints, run.step, tensors=tensors,
                                trainer_state={**trainer_state, "optimizer": optimizer_host},
                                config_yaml=run.cfg.to_yaml(), keep=run.cfg.checkpoint.keep,
                                run_id=run.rundir.run_id,
                                async_group=distributed.checkpoint_group() if background else None)
    if background:
        run.pending_save = pending
        return
    path = pending.finish()
    if path is not None:
        info(f"saved checkpoint {path} (sharded)")


def poll_save(run: Run) -> None:
    """At a step boundary: complete a background checkpoint whose shards are all written; never blocks."""
    if run.pending_save is not None and run.pending_save.done():
        finish_pending_save(run)


def finish_pending_save(run: Run) -> None:
    """Wait for a background checkpoint, then (rank 0) put it in place."""
    pending, run.pending_save = run.pending_save, None
    if pending is not None:
        path = pending.finish(collective=False)
        if path is not None:
            info(f"saved checkpoint {path} (sharded, written in the background; in place at step {run.step})")


def wants_eval(run: Run) -> bool:
    return run.data.eval_loader is not None or (run.cfg.mode == "ft" and run.cfg.eval.generate
                                                 and bool(run.data.sets.validation_records))


# ---------------------------------------------------------------- the loop
class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        warn(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
             "(send again to abort without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary (also written to summary.json)."""
    run = setup(cfg)
    try:
        with _StopRequest() as stop:
            while True:
                last_step = run.step >= run.total_steps
                fresh = run.step != run.resume_step  # a resumed run already evaluated/saved at this step
                if fresh and wants_eval(run) and (run.step % cfg.eval.every_steps == 0 or last_step):
                    evaluate(run)
                if fresh and run.step > 0 and (run.step % cfg.checkpoint.every_steps == 0 or last_step
                                               or stop.signal or run.early_stopped):
                    save(run)
                if last_step or stop.signal or run.early_stopped:
                    break
                poll_save(run)
                train_step(run)
                if run.step % cfg.logging.every_steps == 0 or run.step == run.total_steps:
                    log_step(run)
        run.progress.close()
        return finish(run, interrupted=stop.signal is not None)
    finally:
        run.progress.close()
        if run.logger:
            run.logger.close()
        run.rundir.close()
        distributed.cleanup()


# ------------------------------------------------------------------ finish
def finish(run: Run, interrupted: bool) -> dict[str, Any]:
    """After the last step: the final model first (final/: HF format + tokenizer; the best model when
    checkpoint.best_metric is set and checkpoint.final=best), then the extras (fine-tuning predictions, samples,
    unigram entropy, plot, summary.json). A failing extra is a warning: the run's outputs are already safe."""
    cfg, env = run.cfg, run.env
    finish_pending_save(run)  # the last checkpoint is on disk before anything else
    summary = {"steps": run.step, "planned_steps": run.total_steps, "tokens": run.tokens,
               "wall_time_s": round(time.time() - run.t_start, 1), "train_time_s": round(run.train_time, 1),
               "tokens_per_s": round(run.tokens / run.train_time, 1) if run.train_time else None,
               "interrupted": interrupted}
    if run.early_stopped:
        summary["early_stopped"] = True
    if run.last_eval:
        summary.update({f"heldout_{k}" if k in ("loss", "accuracy") else k: v for k, v in run.last_eval.items()
                        if k not in ("step", "tokens")})
    if run.best:
        summary.update({"best_metric": run.best["metric"], "best_value": run.best["value"],
                        "best_step": run.best["step"]})
    use_best = run.best is not None and cfg.checkpoint.final == "best" and (run.dir / "best").is_dir()
    model = None if interrupted else distributed.unsharded_copy(run.model, run.strategy)  # collective (FSDP)
    if env.is_main and not interrupted:
        from nanot5.evaluate import write_hf_dir
        from nanot5.fileio import replace_dir

        if use_best:  # final/ = the best model (a copy: best/ stays as it is)
            model = T5.from_hf(run.dir / "best").to(run.device)
            summary["final"] = f"best (step {run.best['step']})"
        tmp = run.dir / f".final.tmp-{os.getpid()}"
        write_hf_dir(model, run.tokenizer, tmp, source=f"run {run.dir}, step {run.best['step'] if use_best else run.step}")
        replace_dir(tmp, run.dir / "final")
        info(f"final model (HF format) in {run.dir / 'final'}" + (f" (the best: step {run.best['step']})"
                                                                  if use_best else ""))
    extras = []
    if env.is_main and not interrupted and cfg.mode == "ft":
        extras.append(("predictions", lambda: summary.update(_predict(run, model))))
    if env.is_main and not interrupted and cfg.mode == "pt" and run.data.eval_loader is not None:
        extras.append(("samples", lambda: _samples(run, model)))
        extras.append(("unigram entropy", lambda: summary.update(_unigram_entropy(run))))
    if env.is_main:
        if not interrupted:
            extras.append(("loss plot", lambda: _plot(run, model, summary)))
        extras.append(("summary.json", lambda: atomic_write_text(run.dir / "summary.json",
                                                                 json.dumps(summary, indent=2) + "\n")))
    for name, extra in extras:
        try:
            extra()
        except Exception as e:  # the run's real outputs are written: report, do not fail the run
            warn(f"could not write the {name}: {type(e).__name__}: {e}")
    info(f"{'interrupted' if interrupted else 'done'}: {json.dumps(summary)}")
    info(f"run directory: {run.dir}")
    return summary


def _predict(run: Run, model: T5) -> dict[str, Any]:
    """Generations of the final model for the validation set (SNI: the test tasks), scored; predictions.jsonl
    and metrics.json in the run folder."""
    from nanot5.evaluate import predict

    records = run.data.sets.validation_records
    if not records:
        info("no validation set: no predictions (nanot5 predict model=RUN_DIR data.source=... generates later)")
        return {}
    metrics = predict(model, run.tokenizer, run.cfg, records, device=run.device, amp=run.amp, out_dir=run.dir,
                      sni=run.data.sets.sni, print_table=True)
    overall = {k: v for k, v in metrics.items() if "_for_" not in k}
    if run.logger:
        run.logger.log({"kind": "predict", "step": run.step, **overall})
    return overall


def _samples(run: Run, model: T5) -> None:
    from nanot5.evaluate import fill_in_samples

    text = fill_in_samples(model, run.tokenizer, run.data.eval_loader, amp=run.amp, device=run.device)
    atomic_write_text(run.dir / "samples.txt", text + "\n")
    info("what the model fills in on held-out text (also in samples.txt):\n" + text)


def _unigram_entropy(run: Run) -> dict[str, float]:
    from nanot5.evaluate import unigram_entropy

    d = run.cfg.data
    source = d.validation_source or d.source
    if source == "c4" or source.startswith("hf:"):  # streamed: not worth a second pass over the network
        return {}
    split = "train" if d.validation_source else "validation"
    return {"unigram_entropy": round(unigram_entropy(source, run.tokenizer, split=split, text_column=d.text_column,
                                                     on_error=d.on_error), 4)}


def _plot(run: Run, model: T5, summary: dict[str, Any]) -> None:
    c = model.config
    title = (f"nanot5 {run.cfg.mode}: {run.cfg.model.name}" + (" + overrides" if run.cfg.model.overwrite else "")
             + f", {model.num_parameters() / 1e6:.1f}M params (d_model {c.d_model}, {c.num_layers}+"
               f"{c.num_decoder_layers} layers, vocab {c.vocab_size})")
    plot_losses(run.dir / "metrics.jsonl", run.dir / "loss.png", title=title,
                baseline=summary.get("unigram_entropy"))


# ------------------------------------------------------------------- CLI
def _main(argv: list[str], *, command: str, default_preset: str, mode: str) -> int:
    if any(a in ("-h", "--help") for a in argv):
        defaults = load_config([a for a in argv if "=" in a and not a.startswith("-")],
                               default_preset=default_preset, mode=mode)
        print(f"usage: nanot5 {command} [preset=NAME] [config=FILE.yaml] [key=value ...] [--dry-run]\n\n"
              f"Presets (nanot5/configs): see `preset=`; default {default_preset}. Keys use nanoT5's names; "
              "nanoT5's task=pt|ft also works.\n--dry-run prints the resolved run and exits.\n\n"
              f"Config keys (defaults of preset {defaults.preset or 'none'}):{format_keys(defaults)}")
        return 0
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    notes: list[str] = []
    cfg = load_config(argv, default_preset=default_preset, mode=mode, notes=notes)
    for note in notes:
        info(note)
    if dry:
        return dry_run(cfg)
    train(cfg)
    return 0


def dry_run(cfg: Config) -> int:
    """Print the resolved run (architecture and size without allocating weights) and exit."""
    with torch.device("meta"):
        model = T5(model_config(cfg))
    env = distributed.DistEnv(device=distributed.resolve_device(cfg.device))
    steps = cfg.optim.total_steps if cfg.optim.epochs <= 0 else f"{cfg.optim.epochs} epochs"
    print_summary(cfg, model, None, env, RunDir.resolve(cfg.run.dir), cfg.optim.batch_size // cfg.optim.grad_acc,
                  steps)
    return 0


def pretrain_main(argv: list[str]) -> int:
    """`nanot5 pretrain [preset=nanot5-base] [config=FILE] [key=value ...] [--dry-run]`."""
    return _main(argv, command="pretrain", default_preset="nanot5-base", mode="pt")


def finetune_main(argv: list[str]) -> int:
    """`nanot5 finetune [preset=sni] [model.name=DIR|hub-name] [key=value ...] [--dry-run]`."""
    return _main(argv, command="finetune", default_preset="sni", mode="ft")
