"""One way to build each piece of a run from its config: tokenizer, model, data, autocast context.

`train.py` and `evaluate.py` both build through here (and never import each other):

    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, len(tokenizer))
    data = Data(cfg, tokenizer, env, micro_batch)       # training batches + held-out loader
    amp = autocast_context(cfg.precision, device)
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from nanot5 import distributed
from nanot5.checkpoint import load_checkpoint
from nanot5.config import Config, config_from_dict
from nanot5.errors import CheckpointError, ConfigError, DataError, NanoT5Error
from nanot5.log import info
from nanot5.model import T5, T5Config


# ------------------------------------------------------------------ precision
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


# ------------------------------------------------------------------ tokenizer
def build_tokenizer(cfg: Config):
    """tokenizer.name: an HF name, a folder, a spiece.model, `demo`, or "" for the one saved with model.name."""
    from nanot5.data.tokenizer import load_tokenizer

    name = cfg.tokenizer.name or cfg.model.name
    if name == "demo":
        from nanot5.data.demo import demo_tokenizer

        tokenizer = load_tokenizer(demo_tokenizer())
    else:
        if not cfg.tokenizer.name and Path(name).is_dir() and not _has_tokenizer_files(Path(name)):
            raise ConfigError(f"model.name={name} has no tokenizer files (spiece.model, tokenizer.json or "
                              "tokenizer_config.json); set tokenizer.name to the tokenizer it was trained with")
        try:
            tokenizer = load_tokenizer(name)
        except (ValueError, OSError) as e:
            raise ConfigError(f"tokenizer.name={name!r}: {e}") from e
    if cfg.mode == "pt" and cfg.data.objective == "ul2" and cfg.data.ul2_mode_tokens:
        from nanot5.data.denoisers import (
            add_mode_tokens,  # [NLU] [NLG] [S2S] after the sentinels
        )

        tokenizer = add_mode_tokens(tokenizer, model_vocab_size=model_config(cfg).vocab_size)
    return tokenizer


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in ("spiece.model", "tokenizer.json", "tokenizer_config.json"))


# ---------------------------------------------------------------------- model
def model_config(cfg: Config) -> T5Config:
    """The architecture: a built-in name or an HF config.json, with model.overwrite applied."""
    name = cfg.model.name
    overwrite = {**cfg.model.overwrite, "gradient_checkpointing": cfg.model.gradient_checkpointing,
                 "attention": cfg.model.attention, "lm_head_init": cfg.model.lm_head_init}
    try:
        if name.split("/")[-1] in T5Config.names():
            return T5Config.from_name(name, **overwrite)
        return T5Config(**{**T5Config.from_hf(hf_model_dir(name)).to_dict(), **overwrite})
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model.name={name} / model.overwrite: {e}") from None


def hf_model_dir(name: str) -> Path:
    """A local HF model folder, or a hub name downloaded (when online); ConfigError otherwise."""
    from nanot5.hf import resolve_dir

    try:
        return resolve_dir(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name={name}: {e}") from None


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
        try:
            model = T5.from_hf(hf_model_dir(cfg.model.name), **{k: getattr(mcfg, k) for k in (
                "dropout_rate", "gradient_checkpointing", "attention")})
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model.name={cfg.model.name}: {e}") from None
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
        raise ConfigError(f"model.checkpoint_path={path}: neither a nanot5 checkpoint (meta.json) "
                          "nor an HF model directory (config.json)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def load_model_dir(path: str, device) -> tuple[T5, Any]:
    """A model and its tokenizer (None if the folder has none) from an HF-format folder, a run folder
    (its final/) or a nanot5 checkpoint."""
    from nanot5.data.tokenizer import load_tokenizer

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model={path}: no such folder")
    if (p / "final" / "config.json").is_file():  # a run directory
        p = p / "final"
    tokenizer = None
    if (p / "meta.json").is_file():  # a nanot5 checkpoint
        import yaml

        ckpt = load_checkpoint(p)
        cfg = config_from_dict(yaml.safe_load(ckpt["config_yaml"]))
        tokenizer = build_tokenizer(cfg)
        # the architecture from the checkpoint's config, the weights from the checkpoint itself
        arch = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=True, checkpoint_path=""))
        model = build_model(arch, len(tokenizer))
        model.load_state_dict(ckpt["model"])
    elif (p / "config.json").is_file():
        try:
            model = T5.from_hf(str(p))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model={path}: {e}") from None
        if _has_tokenizer_files(p):
            tokenizer = load_tokenizer(p)
    else:
        raise ConfigError(f"model={path}: not an HF model folder (config.json), a run folder (final/) or a "
                          "nanot5 checkpoint (meta.json)")
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------- data
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask",
                "encoder_segment_ids", "decoder_segment_ids")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs of a batch on `device` (non-blocking from pinned memory); other fields stay behind."""
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if batch.get(k) is not None}


class Reiterable:
    """An iterable that calls `make()` for a fresh iterator every time (a held-out set evaluated repeatedly)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


class Data:
    """Training batches and held-out evaluation for one mode; training state via state_dict for resume."""

    def __init__(self, cfg: Config, tokenizer, env: distributed.DistEnv, micro_batch: int,
                 num_readers: int | None = None, decoder_start_id: int = 0):
        """num_readers: the logical readers of the run being resumed (default: data.num_readers or auto);
        decoder_start_id: the model's decoder start token (packed fine-tuning batches restart on it)."""
        self.cfg, self.env = cfg, env
        self.sets = None  # fine-tuning: the tokenized sets and the validation records (nanot5.data.finetune)
        try:
            if cfg.mode == "pt":
                self._pretrain(cfg, tokenizer, env, micro_batch, num_readers)
            else:
                self._finetune(cfg, tokenizer, env, micro_batch, decoder_start_id)
        except NanoT5Error:
            raise
        except (ValueError, OSError) as e:  # layout (batch vs readers/workers) and data-file problems
            raise DataError(f"data: {e}") from None
        self.iterator = iter(self.train)

    def _pretrain(self, cfg: Config, tokenizer, env, micro_batch: int, num_readers: int | None) -> None:
        from nanot5.data.loader import PretrainLoader
        from nanot5.data.span_corruption import compute_lengths, span_counts

        d = cfg.data
        raw, _ = compute_lengths(d.input_length, d.mlm_probability, d.mean_noise_span_length)
        spans = span_counts(raw, d.mlm_probability, d.mean_noise_span_length)[1]
        if spans > tokenizer.num_sentinels:
            raise ConfigError(f"data.input_length={d.input_length}: span corruption needs {spans} sentinel tokens "
                              f"per example but tokenizer {tokenizer.name!r} has {tokenizer.num_sentinels}")
        common = dict(tokenizer=tokenizer, input_length=d.input_length, noise_density=d.mlm_probability,
                      mean_noise_span_length=d.mean_noise_span_length, text_column=d.text_column,
                      on_error=d.on_error, rank=env.rank, world_size=env.world_size)
        self.train = PretrainLoader(source=d.source, split="train", batch_size=micro_batch, seed=cfg.seed,
                                    num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, infinite=True,
                                    num_readers=num_readers or d.num_readers or None,
                                    objective=d.objective, mixture=d.ul2_mixture, mode_tokens=d.ul2_mode_tokens,
                                    pin_memory=env.device.type == "cuda", **common)
        info(f"training data: {self.train.source.summary()}")
        self.steps_per_epoch = None
        self.eval_loader = None
        if cfg.eval.steps > 0:
            # held-out loss is always plain span corruption, comparable across objectives;
            # eval.batch_size is global, like optim.batch_size: every rank takes its share
            eval_bs = cfg.eval.batch_size // env.world_size if cfg.eval.batch_size else micro_batch
            if eval_bs < 1:
                raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} is smaller than the {env.world_size} "
                                  "processes: every rank needs at least one row")
            self.eval_loader = PretrainLoader(
                source=d.validation_source or d.source, split="validation", batch_size=eval_bs, seed=cfg.seed,
                num_workers=0, shuffle_buffer=0, infinite=False, max_batches=cfg.eval.steps,
                num_readers=d.num_readers or env.world_size, **common)
            held = self.eval_loader.source
            info(f"validation data: {held.summary()}")
            if getattr(held, "files", None) is not None and held.files == getattr(self.train.source, "files", []):
                raise ConfigError(f"data.source={d.source} has no separate validation files, so held-out loss would "
                                  "be measured on the training data; set data.validation_source (or eval.steps=0)")

    def _finetune(self, cfg: Config, tokenizer, env, micro_batch: int, decoder_start_id: int) -> None:
        import itertools

        from nanot5.data.batching import Seq2SeqBatches, eval_batches
        from nanot5.data.finetune import finetune_sets

        d = cfg.data
        self.sets = sets = finetune_sets(cfg, tokenizer)
        for line in sets.describe():
            info(line)
        self.train = Seq2SeqBatches(sets.train, batch_size=micro_batch, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size, batching=d.batching, pad_id=tokenizer.pad_id,
                                    max_seq_len=d.max_seq_len, max_target_len=d.max_target_len,
                                    decoder_start_id=decoder_start_id)
        self.steps_per_epoch = len(self.train) // cfg.optim.grad_acc
        self.eval_loader = None
        if sets.validation is not None:
            eval_bs = max(1, cfg.eval.batch_size // env.world_size) if cfg.eval.batch_size else micro_batch
            limit = cfg.eval.steps or None  # fine-tuning: 0 = the whole validation set
            self.eval_loader = Reiterable(lambda: itertools.islice(eval_batches(
                sets.validation, batch_size=eval_bs, pad_id=tokenizer.pad_id, rank=env.rank,
                world_size=env.world_size), limit))

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
