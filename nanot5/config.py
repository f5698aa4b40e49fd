"""Run configuration: typed dataclasses, presets, YAML files and `a.b=value` overrides.

Key names follow nanoT5's Hydra config wherever nanoT5 has the option (optim.base_lr,
optim.batch_size, data.input_length, ...), so its command lines carry over. Config objects are
frozen: built once (preset -> config file -> command line), saved with the run and every
checkpoint, never mutated while training.

    cfg = load_config(["preset=nanot5-base", "optim.base_lr=1e-2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nanot5.data.denoisers import DEFAULT_UL2_MIXTURE, OBJECTIVES, parse_mixture
from nanot5.errors import ConfigError
from nanot5.metrics import GENERATION_METRICS

PRESET_DIR = Path(__file__).resolve().parent / "configs"

OPTIMIZERS = ("adamwscale", "adafactor", "adamw")
SCHEDULERS = ("cosine", "legacy", "constant", "linear")
PRECISIONS = ("fp32", "bf16", "tf32", "fp16")
MODES = ("pt", "ft")
MAX_SENTINELS = 100  # <extra_id_0..99> of T5 tokenizers


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


def _check_positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}.{name} must be positive, got {getattr(obj, name)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "t5-v1_1-base"  # built-in architecture (t5-v1_1-tiny/small/base/large/xl, t5-small/base/large), HF directory or hub name
    random_init: bool = True  # true: fresh weights with model.name's architecture; false: load model.name's weights
    overwrite: dict = field(default_factory=dict)  # T5Config fields to change, e.g. model.overwrite.num_layers=4
    checkpoint_path: str = ""  # start from the weights of this nanot5 checkpoint or HF directory
    compile: bool = False  # torch.compile the model (per block) for training
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    attention: str = "auto"  # eager | sdpa | flex | auto (CUDA: flex; CPU: eager to train, sdpa to evaluate)
    lm_head_init: str = "scaled"  # untied lm_head init std: scaled (d_model**-0.5) | hf (1.0, as HF and nanoT5)

    def __post_init__(self):
        from nanot5.model import T5Config

        _check_choice("model.attention", self.attention, ("eager", "sdpa", "flex", "auto"))
        _check_choice("model.lm_head_init", self.lm_head_init, ("scaled", "hf"))

        hints = typing.get_type_hints(T5Config)
        for key, value in self.overwrite.items():
            if key not in hints:
                close = difflib.get_close_matches(key, list(hints), n=3)
                hint = f"; did you mean {' or '.join('model.overwrite.' + c for c in close)}?" if close else ""
                raise ConfigError(f"unknown config key 'model.overwrite.{key}' (not a T5Config field){hint}")
            _check_overwrite_type(key, value, hints[key])


def _check_overwrite_type(key: str, value: Any, hint: Any) -> None:
    allowed = tuple(t for t in typing.get_args(hint) if t is not type(None)) or (hint,)
    if value is None and type(None) in typing.get_args(hint):
        return
    ok = any((isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)))
             or (t is float and isinstance(value, int) and not isinstance(value, bool)) for t in allowed)
    if not ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise ConfigError(f"model.overwrite.{key}: expected {names}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"model.overwrite.{key}: must be a finite number, got {value}")


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = "google/t5-v1_1-base"  # HF name, local folder or spiece.model, `demo` (trained once), or "" for model.name's own


@dataclass(frozen=True)
class DataConfig:
    source: str = "c4"  # c4 | hf:NAME[:CONFIG][:SPLIT] | demo | local file, folder or glob | sni (fine-tuning)
    validation_source: str = ""  # held-out data, same forms as source; "" = the validation split of source
    text_column: str = "text"  # field that holds the text in json/jsonl/parquet/HF records
    input_length: int = 512  # encoder tokens per example (pre-training: after span corruption)
    mlm_probability: float = 0.15  # share of tokens masked by span corruption (noise density)
    mean_noise_span_length: float = 3.0  # mean length of a masked span
    objective: str = "span"  # span: T5 span corruption | ul2: UL2 mixture of denoisers (ul2_mixture) | prefix_lm
    ul2_mixture: str = DEFAULT_UL2_MIXTURE  # objective=ul2: comma-separated R|X:MEAN_SPAN:RATE:WEIGHT and S:RATE:WEIGHT
    ul2_mode_tokens: bool = True  # objective=ul2: prepend [NLU]/[NLG]/[S2S] to R/X/S inputs (added to the tokenizer)
    num_workers: int = 2  # DataLoader worker processes per rank (0: read in the main process)
    num_readers: int = 0  # logical corpus readers over all ranks; fix it for equal batches across world sizes (0: auto)
    shuffle_buffer: int = 10_000  # windows shuffled together per reader (0: keep document order)
    on_error: str = "raise"  # bad records: raise (stop with file:line) | skip (count and go on)
    input_column: str = "input"  # fine-tuning: column with the model input (when data.template is "")
    target_column: str = "target"  # fine-tuning: column with the target (a string or a list of acceptable strings)
    template: str = ""  # fine-tuning: input built from columns, e.g. "summarize: {document}"; "" = input_column as is
    target_template: str = ""  # fine-tuning: target built from columns, e.g. "{label}"; "" = target_column as is
    validation_fraction: float = 0.0  # fine-tuning: hold out this seeded share of the training records
    batching: str = "grouped"  # fine-tuning: naive (random, padded) | grouped (by length) | packed (several per row)
    sni_dir: str = "natural-instructions"  # Super-Natural Instructions checkout (splits/, tasks/)
    sni_split: str = "default"  # folder under sni_dir/splits
    max_seq_len: int = 1024  # fine-tuning input tokens per example; longer inputs are cut (and counted)
    max_target_len: int = 128  # fine-tuning target tokens per example; longer targets are cut (and counted)
    max_num_instances_per_task: int = 100  # SNI: instances sampled from each training task
    max_num_instances_per_eval_task: int = 100  # SNI: first instances of each test task that are scored
    add_task_name: bool = False  # SNI prompt: start with the task name
    add_task_definition: bool = True  # SNI prompt: include the task definition
    num_pos_examples: int = 2  # SNI prompt: positive examples shown
    num_neg_examples: int = 0  # SNI prompt: negative examples shown
    add_explanation: bool = False  # SNI prompt: add the examples' explanations
    tk_instruct: bool = False  # SNI: draw one of Tk-Instruct's prompt layouts per instance

    def __post_init__(self):
        _check_positive(self, "data", "input_length", "mean_noise_span_length", "max_seq_len",
                        "max_target_len")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        for name in ("num_workers", "num_readers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        _check_choice("data.on_error", self.on_error, ("raise", "skip"))
        _check_choice("data.objective", self.objective, OBJECTIVES)
        try:
            parse_mixture(self.ul2_mixture)
        except ValueError as e:
            raise ConfigError(f"data.ul2_mixture: {e}") from None
        if self.source != "sni":  # span corruption must be possible at this length (fine-tuning skips it)
            import numpy as np

            from nanot5.data.span_corruption import (
                compute_lengths,
                random_spans_noise_mask,
                span_counts,
            )

            try:
                raw, _ = compute_lengths(self.input_length, self.mlm_probability, self.mean_noise_span_length)
                _, spans = span_counts(raw, self.mlm_probability, self.mean_noise_span_length)
                random_spans_noise_mask(raw, self.mlm_probability, self.mean_noise_span_length, batch=1,
                                        rng=np.random.default_rng(0))  # raises where no mask exists
            except ValueError as e:
                raise ConfigError(f"data.input_length={self.input_length} with data.mlm_probability="
                                  f"{self.mlm_probability}: span corruption is impossible ({e})") from None
            if spans > MAX_SENTINELS:
                raise ConfigError(
                    f"data.input_length={self.input_length} with data.mlm_probability={self.mlm_probability}: "
                    f"span corruption would need {spans} sentinel tokens "
                    f"per example, more than a T5 tokenizer's {MAX_SENTINELS}; lower data.input_length or raise "
                    "data.mean_noise_span_length")
        _check_choice("data.batching", self.batching, ("naive", "grouped", "packed"))
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction > 0 and self.validation_source:
            raise ConfigError("set data.validation_source or data.validation_fraction, not both")
        from nanot5.data.seq2seq import template_columns  # no torch: cheap

        if self.template:
            template_columns(self.template, "data.template")
        if self.target_template:
            template_columns(self.target_template, "data.target_template")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamwscale"  # adamwscale (nanoT5) | adafactor | adamw
    base_lr: float = 2e-2  # peak learning rate (legacy schedule: ignored)
    batch_size: int = 128  # GLOBAL batch: all ranks and all grad_acc micro-batches together
    total_steps: int = 65536  # optimizer steps
    epochs: int = -1  # > 0: derive total_steps from the data set size (fine-tuning)
    warmup_steps: int = 10000  # linear warm-up steps
    lr_scheduler: str = "cosine"  # cosine | legacy (T5's inverse sqrt) | constant | linear
    weight_decay: float = 0.0  # decoupled weight decay on matrices
    grad_clip: float = 1.0  # max global gradient L2 norm (<= 0: no clipping)
    grad_acc: int = 1  # micro-batches per optimizer step
    final_cosine: float = 1e-5  # learning rate at the end of the cosine schedule
    skip_nonfinite: bool = False  # skip steps with a non-finite loss instead of stopping (one host sync per step)
    early_stopping_patience: int = 0  # stop after N evaluations without a better checkpoint.best_metric (0: never)

    def __post_init__(self):
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_positive(self, "optim", "base_lr", "batch_size", "grad_acc")
        if self.total_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set optim.total_steps or optim.epochs to a positive number")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.final_cosine < 0 or self.weight_decay < 0:
            raise ConfigError("optim.final_cosine and optim.weight_decay must be >= 0")
        if self.epochs <= 0:
            check_warmup(self.warmup_steps, self.total_steps)
        if self.early_stopping_patience < 0:
            raise ConfigError(f"optim.early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.batch_size % self.grad_acc:
            raise ConfigError(
                f"optim.batch_size={self.batch_size} is not divisible by optim.grad_acc={self.grad_acc}: "
                "the global batch is split into grad_acc equal micro-batches")


def check_warmup(warmup_steps: int, total_steps: int) -> None:
    """Every schedule: a warm-up must end before the last step."""
    if warmup_steps and warmup_steps >= total_steps:
        raise ConfigError(f"optim.warmup_steps={warmup_steps} must be < the {total_steps} training steps "
                          "(optim.total_steps or what optim.epochs gives)")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 100_000  # evaluate every N optimizer steps (and at the end)
    steps: int = 500  # held-out batches per evaluation (0: no held-out evaluation; fine-tuning: 0 = all)
    batch_size: int = 0  # GLOBAL evaluation batch (0: the training micro-batch per rank)
    generate: bool = False  # fine-tuning: also generate for the validation set at every evaluation and score it
    metrics: str = "exact_match,rougeL"  # fine-tuning: generation metrics, any of exact_match,rougeL,bleu,accuracy
    max_examples: int = 0  # fine-tuning: validation examples generated for per evaluation (0: all)

    def __post_init__(self):
        _check_positive(self, "eval", "every_steps")
        for name in ("steps", "batch_size", "max_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        unknown = [m for m in self.metric_names if m not in GENERATION_METRICS]
        if unknown or not self.metric_names:
            raise ConfigError(f"eval.metrics={self.metrics!r}: choose from {', '.join(GENERATION_METRICS)} "
                              "(comma-separated)")

    @property
    def metric_names(self) -> list[str]:
        return [m.strip() for m in self.metrics.split(",") if m.strip()]


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 0  # tokens generated at most (0: data.max_target_len)
    min_new_tokens: int = 0  # the end-of-sequence token is suppressed before this many
    num_beams: int = 1  # beam search when > 1
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log p) / length ** length_penalty
    early_stopping: str = "false"  # beam search: true (stop at num_beams finished) | false | never, as in HF
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size (0: off)
    do_sample: bool = False  # sample instead of taking the most likely token (with beams: beam sampling)
    temperature: float = 1.0  # sampling: divide the logits by this
    top_k: int = 0  # sampling: only the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: only the most likely tokens that make up this probability (1: all)
    batch_size: int = 0  # examples per generation batch (0: the training micro-batch, at least 8)
    seed: int = 0  # sampling: seed of the generator (reproducible samples)

    def __post_init__(self):
        for name in ("max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "top_k", "batch_size", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"generate.{name} must be >= 0, got {getattr(self, name)}")
        _check_positive(self, "generate", "num_beams", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}")
        _check_choice("generate.early_stopping", self.early_stopping.lower(), ("true", "false", "never"))
        if self.max_new_tokens and self.min_new_tokens > self.max_new_tokens:
            raise ConfigError("generate.min_new_tokens must be <= generate.max_new_tokens")

    def kwargs(self, max_target_len: int) -> dict[str, Any]:
        """Keyword arguments of `T5.generate` (without the generator)."""
        stop = {"true": True, "false": False, "never": "never"}[self.early_stopping.lower()]
        return dict(max_new_tokens=self.max_new_tokens or max_target_len, min_new_tokens=self.min_new_tokens,
                    num_beams=self.num_beams, length_penalty=self.length_penalty, early_stopping=stop,
                    no_repeat_ngram_size=self.no_repeat_ngram_size, do_sample=self.do_sample,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100_000  # save every N optimizer steps (and at the end, and on Ctrl-C/SIGTERM)
    keep: int = 2  # newest checkpoints of this run to keep
    best_metric: str = ""  # keep the best model by this evaluation result in run.dir/best: loss or a generation metric
    final: str = "best"  # what final/ holds: best (the best model, when best_metric is set) | last
    async_save: bool = False  # FSDP: write sharded checkpoints in the background while training goes on

    def __post_init__(self):
        _check_positive(self, "checkpoint", "every_steps", "keep")
        _check_choice("checkpoint.best_metric", self.best_metric, ("", "loss", *GENERATION_METRICS))
        _check_choice("checkpoint.final", self.final, ("best", "last"))


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 100  # log training loss, lr, throughput every N steps
    tensorboard: bool = True  # write TensorBoard events to run.dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "nanot5"  # W&B project name
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines
    peak_tflops: float = 0.0  # device peak for MFU (0: known GPU table, measured on CPU)

    def __post_init__(self):
        _check_positive(self, "logging", "every_steps")
        _check_choice("logging.progress", self.progress, ("auto", "bar", "lines"))
        if self.peak_tflops < 0:
            raise ConfigError(f"logging.peak_tflops must be >= 0, got {self.peak_tflops}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = ""  # run folder (default runs/<timestamp>)
    overwrite: bool = False  # a fresh run into a folder that holds a run: move the old one aside (never deleted)


@dataclass(frozen=True)
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp (only used under torchrun with > 1 process)

    def __post_init__(self):
        _check_choice("distributed.strategy", self.strategy, ("ddp", "fsdp"))


@dataclass(frozen=True)
class Config:
    mode: str = "pt"  # pt: span-corruption pre-training | ft: fine-tuning
    preset: str = ""  # preset the config was built from (nanot5/configs/NAME.yaml)
    seed: int = 2137  # seed of weights, data order and masks
    device: str = "auto"  # auto | cpu | cuda | cuda:N (gpu = cuda)
    precision: str = "bf16"  # bf16 | fp16 (autocast) | tf32 | fp32
    resume: str = ""  # "" (fresh run) | auto (newest usable checkpoint of run.dir) | path to a checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not (self.device in ("auto", "cpu", "cuda", "gpu") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N")
        best = self.checkpoint.best_metric
        if best in GENERATION_METRICS and not self.eval.generate:
            raise ConfigError(f"checkpoint.best_metric={best} is a generation metric: set eval.generate=true")
        if best in GENERATION_METRICS and self.data.source != "sni" and best not in self.eval.metric_names:
            raise ConfigError(f"checkpoint.best_metric={best} is not in eval.metrics={self.eval.metrics!r}")
        if self.optim.early_stopping_patience and not best:
            raise ConfigError("optim.early_stopping_patience needs checkpoint.best_metric (what must improve)")
        if best and self.mode == "pt" and best != "loss":
            raise ConfigError(f"checkpoint.best_metric={best}: pre-training evaluates the held-out loss only")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- building
def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = _dataclass_type(cls, f.name)
        keys += _all_keys(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return keys


def _dataclass_type(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys() + ["preset", "config"], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check/convert a parsed YAML value to the field's type; errors name the key."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML's true/false for a text option such as generate.early_stopping
            return str(value).lower()
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict or typing.get_origin(hint) is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a field type this parser does not know
        raise TypeError(f"config field {key} has unsupported type {hint}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _merge(tree: dict[str, Any], updates: dict[str, Any], cls=Config, prefix: str = "") -> None:
    """Deep-merge nested `updates` into `tree`, validating keys and types against `cls`."""
    hints = typing.get_type_hints(cls)
    for key, value in updates.items():
        full = prefix + key
        if key not in hints:
            raise _unknown_key(full)
        sub = _dataclass_type(cls, key)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {sub.__name__} keys, got {value!r}")
            _merge(tree.setdefault(key, {}), value, sub, full + ".")
        elif full == "model.overwrite":
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of T5Config fields, got {value!r}")
            tree.setdefault(key, {}).update(value)
        else:
            if full == "precision" and value in ("no", False):  # nanoT5: precision=no (YAML reads it as false)
                value = "fp32"
            tree[key] = _coerce(full, value, hints[key])


def _build(cls, tree: dict[str, Any]):
    kwargs = {}
    for f in fields(cls):
        if f.name in tree:
            sub = _dataclass_type(cls, f.name)
            kwargs[f.name] = _build(sub, tree[f.name]) if sub else tree[f.name]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    data = read_yaml(path)
    base = data.pop("inherit", None)  # a preset may build on another one
    data.pop("sweep", None)  # a grid for `nanot5 sweep` (see preset_sweep); not part of a run's config
    tree = load_preset(base) if base else {}
    _merge(tree, data)
    return tree


def preset_sweep(name: str) -> dict[str, list]:
    """The `sweep:` grid of a preset ({dotted key: [values]}), empty if it has none (inherited too)."""
    data = read_yaml(PRESET_DIR / f"{name}.yaml") if (PRESET_DIR / f"{name}.yaml").is_file() else {}
    grid = preset_sweep(data["inherit"]) if data.get("inherit") else {}
    for key, values in (data.get("sweep") or {}).items():
        grid[key] = values if isinstance(values, list) else [values]
    return grid


def _is_str_field(key: str) -> bool:
    """True when the dotted key names a `str` field of Config (False for unknown keys: _merge reports them)."""
    cls = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        sub = _dataclass_type(cls, part)
        if sub is None:
            return i == len(parts) - 1 and hints[part] is str
        cls = sub
    return False


# nanoT5 command-line keys whose meaning does not carry over: accepted so its command lines still run.
NANOT5_IGNORED = {
    "model.klass": "nanot5 has one T5 implementation (equal to HF's, tested)",
    "model.add_config": "nanot5's T5Config has no extra fields to add",
    "logging.grad_l2": "the gradient norm is always logged",
    "logging.weights_l2": "the weight norm is always logged",
    "logging.neptune": "use logging.wandb or TensorBoard",
    "local_env": "paths are config keys in nanot5",
}


def _parse_pairs(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for arg in overrides:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {arg!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if _is_str_field(key.strip()) and value is not None and not isinstance(value, str):
            value = raw  # text fields take the text as typed: data.template=summarize: {document}
        pairs.append((key.strip(), value))
    return pairs


def _nanot5_compat(pairs: list[tuple[str, Any]], notes: list[str]) -> list[tuple[str, Any]]:
    """Translate nanoT5's own command-line keys: task=pt|ft -> mode; refuse eval_only/predict_only=true
    (separate commands here); drop keys that mean nothing in nanot5, with a note."""
    out = []
    for key, value in pairs:
        if key == "task":
            if value not in MODES:
                raise ConfigError(f"task={value!r}: use task=pt (pre-training) or task=ft (fine-tuning)")
            out.append(("mode", value))
        elif key in ("eval_only", "predict_only"):
            if value not in (False, "false", 0):
                cmd = "evaluate" if key == "eval_only" else "predict"
                raise ConfigError(f"{key}=true: run `nanot5 {cmd} model=DIR ...` instead")
        elif any(key == k or key.startswith(k + ".") for k in NANOT5_IGNORED):
            base = next(k for k in NANOT5_IGNORED if key == k or key.startswith(k + "."))
            notes.append(f"ignoring nanoT5 option {key}: {NANOT5_IGNORED[base]}")
        else:
            out.append((key, value))
    return out


def load_config(overrides: list[str] | None = None, *, default_preset: str = "",
                notes: list[str] | None = None, **defaults: Any) -> Config:
    """Build a Config from `preset=`, `config=FILE` and `key=value` arguments (applied in that order).

    Values are parsed as YAML scalars (`1e-2`, `true`, `null`); `defaults` are dotted keys applied
    before the preset (e.g. mode="ft"). A `model.name` given after a preset replaces the preset's model:
    the preset's `model.overwrite` architecture keys are dropped (never combined with another model
    behind the user's back) unless the user sets them too. Messages about such decisions are appended
    to `notes` (the caller prints them).
    """
    notes = [] if notes is None else notes
    pairs = _nanot5_compat(_parse_pairs(overrides or []), notes)
    preset = next((str(v) for k, v in pairs if k == "preset"), default_preset)
    tree: dict[str, Any] = {}
    for key, value in defaults.items():
        _merge(tree, _nest(key, value))
    if preset:
        _merge(tree, load_preset(preset))
        tree["preset"] = preset
    preset_model = dict(tree.get("model", {}))
    user_overwrite: set[str] = set()
    for key, value in pairs:
        if key == "config":
            layer = read_yaml(value)
            user_overwrite |= set((layer.get("model") or {}).get("overwrite") or {})
            _merge(tree, layer)
    for key, value in pairs:
        if key in ("preset", "config"):
            continue
        layer = _nest(key, value)
        user_overwrite |= set((layer.get("model") or {}).get("overwrite") or {}) if isinstance(
            layer.get("model"), dict) else set()
        _merge(tree, layer)
    model = tree.get("model", {})
    if preset_model.get("overwrite") and model.get("name", ModelConfig.name) != preset_model.get("name",
                                                                                               ModelConfig.name):
        dropped = {k: v for k, v in preset_model["overwrite"].items()
                   if k not in user_overwrite and k != "dropout_rate"}
        if dropped:
            model["overwrite"] = {k: v for k, v in model["overwrite"].items() if k not in dropped}
            notes.append(f"model.name={model['name']} replaces preset {preset}'s model: its model.overwrite "
                         f"{dropped} is not applied (set model.overwrite.KEY=VALUE to change the architecture)")
    return _build(Config, tree)


# ---------------------------------------------------------------- documentation
def _field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field line in a config dataclass's source: its --help text."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^    (\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def describe_keys(cls=Config, prefix: str = "", instance: Any = None) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, description) of every config key, from the dataclasses themselves."""
    instance = cls() if instance is None else instance
    comments = _field_comments(cls)
    out = []
    for f in fields(cls):
        sub = _dataclass_type(cls, f.name)
        value = getattr(instance, f.name)
        if sub:
            out += describe_keys(sub, f"{prefix}{f.name}.", value)
        else:
            hint = typing.get_type_hints(cls)[f.name]
            out.append((prefix + f.name, getattr(hint, "__name__", str(hint)), value, comments.get(f.name, "")))
    return out


def format_keys(defaults: Config | None = None) -> str:
    """A readable table of every config key for `--help` (defaults from `defaults`, e.g. a preset)."""
    rows = describe_keys(instance=defaults)
    width = max(len(k) for k, *_ in rows)
    lines = []
    section = None
    for key, type_name, default, doc in rows:
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"\n  {head or 'general'}:")
        shown = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        lines.append(f"    {key:<{width}}  {type_name:<5} = {shown:<14} {doc}")
    return "\n".join(lines)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a saved config (config.yaml of a run or checkpoint), validating it."""
    tree: dict[str, Any] = {}
    _merge(tree, d)
    return _build(Config, tree)


def read_config(path: str | Path) -> Config:
    return config_from_dict(read_yaml(path))

