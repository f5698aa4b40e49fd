"""The one training loop. Pre-training (mode pt) and SNI fine-tuning (mode ft) differ by config only.

    nanot5 pretrain [preset=demo] [key=value ...]
    nanot5 finetune [preset=sni] [key=value ...]

Loop order per step (nanochat-style, with a `last_step` flag): evaluate, checkpoint, stop?, then
grad_acc micro-steps, clip, set LR, optimizer step, log.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from nanot5 import distributed
from nanot5.checkpoint import (CheckpointError, load_checkpoint, load_latest, rng_state, save_checkpoint,
                               set_rng_state)
from nanot5.config import Config, ConfigError, config_from_dict, load_config
from nanot5.model import T5, T5Config, flops_per_step
from nanot5.tracking import MetricsLogger, Progress, measure_matmul_peak, plot_losses


# ----------------------------------------------------------------- setup
def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast (bf16 works on CPU too); fp32 and tf32 run without autocast."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def set_matmul_precision(precision: str, device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 for fp32 matmuls unless full fp32 was asked for explicitly
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"


def build_tokenizer(cfg: Config):
    from nanot5.data.tokenizer import load_tokenizer

    name = cfg.tokenizer.name or cfg.model.name  # "": the tokenizer saved with the model
    if name == "demo":
        from nanot5.data.demo import demo_tokenizer

        return load_tokenizer(demo_tokenizer())
    try:
        return load_tokenizer(name)
    except (ValueError, OSError) as e:
        raise ConfigError(f"tokenizer.name={name!r}: {e}") from e


def model_config(cfg: Config) -> T5Config:
    name = cfg.model.name
    overwrite = {**cfg.model.overwrite, "gradient_checkpointing": cfg.model.gradient_checkpointing}
    if name.split("/")[-1] in T5Config.names():
        return T5Config.from_name(name, **overwrite)
    return T5Config(**{**T5Config.from_hf(_hf_dir(name)).to_dict(), **overwrite})


def _hf_dir(name: str) -> Path:
    from nanot5.hf import _resolve_dir

    return _resolve_dir(name)


def build_model(cfg: Config, vocab_size: int) -> T5:
    """Random init from a built-in/HF config, or weights from an HF directory / nanot5 checkpoint."""
    mcfg = model_config(cfg)
    if vocab_size > mcfg.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's embedding has "
                          f"{mcfg.vocab_size} rows; set model.overwrite.vocab_size>={vocab_size}")
    if not cfg.model.random_init:
        if cfg.model.name.split("/")[-1] in T5Config.names():
            raise ConfigError(f"model.random_init=false needs weights, but model.name={cfg.model.name!r} is a "
                              "built-in architecture; give an HF directory or hub name")
        model = T5.from_hf(cfg.model.name, **{k: getattr(mcfg, k) for k in
                                              ("dropout_rate", "gradient_checkpointing")})
    else:
        model = T5(mcfg)
    if cfg.model.checkpoint_path:
        load_weights(model, Path(cfg.model.checkpoint_path))
    return model


def load_weights(model: T5, path: Path) -> None:
    """Weights from a nanot5 checkpoint directory or an HF-format directory."""
    if (path / "meta.json").is_file():
        state = load_checkpoint(path)["model"]
    elif (path / "config.json").is_file():
        from nanot5.hf import from_hf_state_dict, read_hf_weights

        state = from_hf_state_dict(read_hf_weights(path), model.config, source=str(path))
    else:
        raise FileNotFoundError(f"model.checkpoint_path={path}: neither a nanot5 checkpoint (meta.json) "
                                "nor an HF model directory (config.json)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def make_run_dir(cfg: Config, env: distributed.DistEnv) -> Path:
    run_dir = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def device_peak_flops(device: torch.device, precision: str, configured_tflops: float) -> float:
    """FLOP/s of the device for MFU: configured, a table of known GPUs, or measured (CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dense_bf16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                      "4090": 165e12, "3090": 71e12, "V100": 125e12}
        for key, peak in dense_bf16.items():
            if key in name:
                return peak if precision in ("bf16", "fp16") else peak / 2
        return float("nan")
    return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)


# ------------------------------------------------------------------ data
class Data:
    """Training batches and evaluation for one mode; every piece exposes state_dict for resume."""

    def __init__(self, cfg: Config, tokenizer, env: distributed.DistEnv, micro_batch: int,
                 num_readers: int | None = None):
        """num_readers: the logical readers of the run being resumed (default: data.num_readers or auto)."""
        self.cfg, self.tokenizer, self.env, self.micro_batch = cfg, tokenizer, env, micro_batch
        if cfg.mode == "pt":
            from nanot5.data.loader import PretrainLoader

            common = dict(tokenizer=tokenizer, input_length=cfg.data.input_length,
                          noise_density=cfg.data.mlm_probability,
                          mean_noise_span_length=cfg.data.mean_noise_span_length,
                          text_column=cfg.data.text_column, on_error=cfg.data.on_error,
                          rank=env.rank, world_size=env.world_size)
            readers = num_readers or cfg.data.num_readers or None
            self.train = PretrainLoader(source=cfg.data.source, split="train", batch_size=micro_batch,
                                        seed=cfg.seed, num_workers=cfg.data.num_workers,
                                        shuffle_buffer=cfg.data.shuffle_buffer, infinite=True,
                                        num_readers=readers, **common)
            val_source = cfg.data.validation_source or cfg.data.source
            # eval.batch_size is global, like optim.batch_size: every rank takes its share
            eval_bs = cfg.eval.batch_size // env.world_size if cfg.eval.batch_size else micro_batch
            self.eval_loader = lambda: PretrainLoader(
                source=val_source, split="validation", batch_size=eval_bs, seed=cfg.seed, num_workers=0,
                shuffle_buffer=1, infinite=False, max_batches=cfg.eval.steps,
                num_readers=cfg.data.num_readers or env.world_size, **common)
            self.steps_per_epoch = None
        else:
            from nanot5.data.sni import SNIBatches, load_sni

            records = load_sni(cfg.data.sni_dir, "train", split=cfg.data.sni_split,
                               max_num_instances_per_task=cfg.data.max_num_instances_per_task)
            self.train = SNIBatches(records, sni_collator(cfg, tokenizer, seed=cfg.seed + env.rank),
                                    batch_size=micro_batch, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size)
            self.steps_per_epoch = len(self.train) // cfg.optim.grad_acc
            self.eval_loader = None
        self.iterator = iter(self.train)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return next(self.iterator)

    def state_dict(self) -> dict[str, Any]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)
        self.iterator = iter(self.train)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Resume from the data states of a run with a different number of processes."""
        if not hasattr(self.train, "load_resharded_state"):  # SNI batches follow the global order already
            raise CheckpointError(f"this data pipeline cannot resume from a checkpoint written by {len(states)} "
                                  f"processes with {self.env.world_size}; resume with {len(states)}")
        self.train.load_resharded_state(states)
        self.iterator = iter(self.train)


def sni_collator(cfg: Config, tokenizer, seed: int):
    from nanot5.data.sni import SNICollator

    d = cfg.data
    return SNICollator(tokenizer.hf, max_source_length=d.max_seq_len, max_target_length=d.max_target_len,
                       add_task_name=d.add_task_name, add_task_definition=d.add_task_definition,
                       num_pos_examples=d.num_pos_examples, num_neg_examples=d.num_neg_examples,
                       add_explanation=d.add_explanation, tk_instruct=d.tk_instruct, seed=seed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if batch.get(k) is not None}


# ------------------------------------------------------------------ loop
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
        print(f"\n[nanot5] {signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(send again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
            loss = forward(**batch).loss / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    return total


def total_steps(cfg: Config, data: Data) -> int:
    if cfg.optim.epochs > 0:
        if data.steps_per_epoch is None:
            raise ConfigError("optim.epochs needs a finite data set; for streamed pre-training set "
                              "optim.total_steps and optim.epochs=-1")
        return cfg.optim.epochs * data.steps_per_epoch
    return cfg.optim.total_steps


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary (also written to summary.json)."""
    from nanot5.optim import build_optimizer, lr_schedule, param_groups
    from nanot5.runtime import tune_cpu_runtime

    tune_cpu_runtime()
    env = distributed.setup(cfg.device)
    device = env.device
    set_matmul_precision(cfg.precision, device)
    micro = cfg.optim.batch_size // cfg.optim.grad_acc
    if micro % env.world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} (global) / optim.grad_acc={cfg.optim.grad_acc}"
                          f" = {micro} is not divisible by the {env.world_size} processes")
    micro //= env.world_size
    run_dir = make_run_dir(cfg, env)
    ckpt_root = run_dir / "checkpoints"

    # resume: the checkpoint's config is authoritative for everything that shapes the run
    resume = None
    if cfg.resume:
        resume = load_latest(ckpt_root) if cfg.resume == "auto" else load_checkpoint(Path(cfg.resume))
        if resume is None:
            print(f"[nanot5] resume=auto: no checkpoint in {ckpt_root}; starting from scratch")
        else:
            check_compatible(cfg, resume)

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, len(tokenizer)).to(device)
    strategy = cfg.distributed.strategy if env.enabled else "single"
    train_model = distributed.wrap_model(model, strategy, env, cfg.precision) if env.enabled else model
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = build_optimizer(cfg.optim.name, groups, lr=cfg.optim.base_lr,
                                weight_decay=cfg.optim.weight_decay)
    # a resumed stream keeps the reader layout it was saved with, whatever the process count now
    saved_readers = None
    if resume is not None and cfg.mode == "pt":
        saved_readers = resume["trainer"]["ranks"][0]["data"]["config"]["num_readers"]
    try:
        data = Data(cfg, tokenizer, env, micro, num_readers=saved_readers)
    except ValueError as e:  # layout (batch vs readers/workers) and data-file errors name the culprit
        raise ConfigError(f"data: {e}") from e
    steps = total_steps(cfg, data)
    try:
        lr_at = lr_schedule(cfg.optim.lr_scheduler, base_lr=cfg.optim.base_lr,
                            warmup_steps=cfg.optim.warmup_steps, total_steps=steps,
                            final_cosine=cfg.optim.final_cosine)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from e

    step, window = 0, {"loss": 0.0, "steps": 0, "skipped": 0}
    tokens_seen = 0
    if resume is not None:
        distributed.load_full_state_dicts(model, optimizer, resume["model"], resume["optimizer"], strategy)
        trainer = resume["trainer"]
        step, window, tokens_seen = trainer["step"], trainer["window"], trainer["tokens"]
        ranks = trainer["ranks"]
        if len(ranks) == env.world_size:
            data.load_state_dict(ranks[env.rank]["data"])
            set_rng_state(ranks[env.rank]["rng"])
        else:
            data.load_resharded([r["data"] for r in ranks])
            set_rng_state(ranks[0]["rng"])
        print(f"[nanot5] resumed from {resume['path']} at step {step}")
    resume_step = step if resume is not None else None
    forward = torch.compile(train_model) if cfg.model.compile else train_model

    config_yaml = cfg.to_yaml()
    logger = None
    if env.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
        logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                               wandb_project=cfg.logging.wandb_project, config=cfg.to_dict(),
                               resume_step=resume_step)
    progress = Progress(steps, step, cfg.logging.progress, enabled=env.is_main)
    amp = autocast_context(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    tokens_per_step = 0
    peak = device_peak_flops(device, cfg.precision, cfg.logging.peak_tflops) if env.is_main else float("nan")
    model_flops = None
    last_eval: dict[str, Any] = {}
    t_start = time.time()
    t_window = time.time()
    train_time = 0.0

    def save():
        # every rank's data position and RNG; weights gathered whole (a collective under FSDP)
        ranks = distributed.all_gather_objects({"data": data.state_dict(), "rng": rng_state()})
        model_state, optim_state = distributed.full_state_dicts(model, optimizer, strategy)
        state = {"step": step, "window": window, "tokens": tokens_seen, "ranks": ranks}
        if env.is_main:
            path = save_checkpoint(ckpt_root, step, model_state=model_state, optimizer_state=optim_state,
                                   trainer_state=state, config_yaml=config_yaml, keep=cfg.checkpoint.keep)
            progress.write(f"[nanot5] saved checkpoint {path}")
        distributed.barrier()

    with _StopRequest() as stop:
        while True:
            last_step = step >= steps
            fresh = step != resume_step  # a resumed run already evaluated/saved at its first step
            if fresh and cfg.mode == "pt" and cfg.eval.steps > 0 and (step % cfg.eval.every_steps == 0 or last_step):
                last_eval = evaluate_heldout(model, data, amp, device, env)
                if logger:
                    logger.log({"kind": "eval", "step": step, **last_eval})
                progress.write(f"[eval] step {step} | held-out loss {last_eval['loss']:.4f} | "
                               f"accuracy {last_eval['accuracy']:.4f}")
            if fresh and step > 0 and (step % cfg.checkpoint.every_steps == 0 or last_step or stop.signal):
                save()
            if last_step or stop.signal:
                break

            # ---- one optimizer step: grad_acc micro-batches
            t0 = time.time()
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [to_device(data.next_batch(), device) for _ in range(cfg.optim.grad_acc)]
            n_tokens = sum(b["input_ids"].numel() + b["labels"].numel() for b in micro_batches)
            if model_flops is None:
                shape = (micro_batches[0]["input_ids"].shape[1], micro_batches[0]["labels"].shape[1])
                model_flops = flops_per_step(model.config, micro * cfg.optim.grad_acc * env.world_size, *shape)
            loss_sum = accumulate_gradients(forward, micro_batches, amp, scaler,
                                            train_model.no_sync if strategy == "ddp" else None)
            tokens_per_step = n_tokens * env.world_size
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (_full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
                         if cfg.optim.grad_clip > 0 else None)
            loss_value = distributed.all_reduce_sum(loss_sum.clone()) / env.world_size
            finite = bool(torch.isfinite(loss_value)) and (grad_norm is None or bool(torch.isfinite(grad_norm)))
            if not finite and not cfg.optim.skip_nonfinite and not scaler:
                progress.close()
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step + 1} (loss {loss_value.item()}); stopping. "
                    f"The last good checkpoint in {ckpt_root} is kept; lower optim.base_lr, use "
                    "precision=fp32, or set optim.skip_nonfinite=true to skip such steps")
            if scaler is not None:  # fp16: the scaler skips non-finite steps and lowers its scale
                scaler.step(optimizer)
                scaler.update()
            elif finite:
                optimizer.step()
            else:
                window["skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            if finite:
                window["loss"] += float(loss_value)
                window["steps"] += 1
            train_time += time.time() - t0

            if step % cfg.logging.every_steps == 0 or step == steps:
                dt = (time.time() - t_window) / max(1, window["steps"] + window["skipped"])
                event = {"kind": "train", "step": step, "loss": window["loss"] / max(1, window["steps"]),
                         "lr": lr, "seconds_per_step": dt, "tokens_per_s": tokens_per_step / dt,
                         "tokens": tokens_seen}
                if grad_norm is not None:
                    event["grad_l2"] = float(grad_norm)
                event["weights_l2"] = float(torch.linalg.vector_norm(
                    torch.stack([_full(p.detach()).float().norm() for p in model.parameters()])))
                if model_flops and math.isfinite(peak):
                    event["mfu"] = model_flops / dt / peak
                if window["skipped"]:
                    event["skipped_steps"] = window["skipped"]
                if logger:
                    logger.log(event)
                progress.update(step, {"loss": f"{event['loss']:.4f}", "lr": f"{lr:.2e}",
                                       "tok/s": f"{event['tokens_per_s']:.0f}"})
                window = {"loss": 0.0, "steps": 0, "skipped": 0}
                t_window = time.time()

    progress.close()
    summary = finish(cfg, model, tokenizer, data, run_dir, env, logger, step, steps, tokens_seen,
                     last_eval, time.time() - t_start, train_time, interrupted=stop.signal is not None)
    if logger:
        logger.close()
    distributed.cleanup()
    return summary


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded DTensor (a collective), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_compatible(cfg: Config, resume: dict[str, Any]) -> None:
    """The checkpoint must come from the same model, data and optimizer setup."""
    saved = config_from_dict(yaml.safe_load(resume["config_yaml"]))
    for key in ("mode", "model.name", "model.overwrite", "tokenizer.name", "data.source", "data.input_length",
                "optim.name", "optim.batch_size", "optim.grad_acc", "seed"):
        a, b = _get(saved, key), _get(cfg, key)
        if a != b:
            raise CheckpointError(f"checkpoint {resume['path']} is incompatible with this run: {key} was {a!r}, "
                                  f"now {b!r} (start a new run.dir, or resume with the same setting)")


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def evaluate_heldout(model: T5, data: Data, amp, device, env) -> dict[str, float]:
    from nanot5.evaluate import heldout_metrics

    was_training = model.training
    model.eval()
    try:
        return heldout_metrics(model, data.eval_loader(), amp=amp, device=device)
    finally:
        model.train(was_training)


def finish(cfg, model, tokenizer, data, run_dir, env, logger, step, steps, tokens, last_eval,
           wall, train_time, interrupted) -> dict[str, Any]:
    summary = {"steps": step, "planned_steps": steps, "tokens": tokens, "wall_time_s": round(wall, 1),
               "train_time_s": round(train_time, 1),
               "tokens_per_s": round(tokens / train_time, 1) if train_time else None,
               "interrupted": interrupted}
    if last_eval:
        summary.update({"heldout_loss": last_eval["loss"], "heldout_accuracy": last_eval["accuracy"]})
        source = cfg.data.validation_source or cfg.data.source
        if env.is_main and source not in ("c4",) and not source.startswith("hf:"):  # local: cheap to read
            from nanot5.evaluate import unigram_entropy

            split = "train" if cfg.data.validation_source else "validation"
            summary["unigram_entropy"] = round(unigram_entropy(source, tokenizer, split=split), 4)
    if cfg.mode == "ft" and not interrupted:
        from nanot5.evaluate import predict_sni

        metrics = predict_sni(model, tokenizer, cfg, out_dir=run_dir if env.is_main else None, device=env.device)
        summary.update({"exact_match": metrics["exact_match"], "rougeL": metrics["rougeL"]})
        if logger:
            logger.log({"kind": "eval", "step": step, "exact_match": metrics["exact_match"],
                        "rougeL": metrics["rougeL"]})
    if not interrupted and getattr(cfg.distributed, "strategy", "") == "fsdp" and env.enabled:
        state, _ = distributed.full_state_dicts(model, None, "fsdp", optimizer_too=False)
        if env.is_main:
            model = T5(model.config)
            model.load_state_dict(state)
    if env.is_main and not interrupted:
        final = run_dir / "final"
        model.save_hf(final)
        tokenizer.save(final)
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png",
                    title=f"nanot5 {cfg.preset or cfg.mode}: {cfg.model.name} config, "
                          f"{model.num_parameters() / 1e6:.1f}M parameters",
                    baseline=summary.get("unigram_entropy"))
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[nanot5] {'interrupted' if interrupted else 'done'}: {json.dumps(summary)}")
        print(f"[nanot5] run directory: {run_dir}")
    return summary


# ------------------------------------------------------------------- CLI
def pretrain_main(argv: list[str]) -> int:
    """`nanot5 pretrain [preset=NAME] [config=FILE] [key=value ...]` (default preset: demo)."""
    if argv and argv[0] in ("-h", "--help"):
        print(pretrain_main.__doc__)
        print("Presets: see nanot5/configs/*.yaml; keys: nanoT5's names, e.g. optim.base_lr=2e-2")
        return 0
    cfg = load_config(argv, default_preset="demo", mode="pt")
    train(cfg)
    return 0


def finetune_main(argv: list[str]) -> int:
    """`nanot5 finetune [preset=sni] [model.name=DIR|hub-name] [data.sni_dir=DIR] [key=value ...]`."""
    if argv and argv[0] in ("-h", "--help"):
        print(finetune_main.__doc__)
        return 0
    cfg = load_config(argv, default_preset="sni", mode="ft")
    train(cfg)
    return 0

