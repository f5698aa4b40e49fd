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
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nanot5.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "configs"

OPTIMIZERS = ("adamwscale", "adafactor", "adamw")
SCHEDULERS = ("cosine", "legacy", "constant", "linear")
PRECISIONS = ("fp32", "bf16", "tf32", "fp16")
MODES = ("pt", "ft")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


def _check_positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}.{name} must be positive, got {getattr(obj, name)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "t5-v1_1-base"  # built-in name (t5-v1_1-tiny/small/base/...), HF directory or hub name
    random_init: bool = True  # False: start from the weights of `name` (HF directory or hub name)
    overwrite: dict = field(default_factory=dict)  # T5Config fields, e.g. model.overwrite.num_layers=2
    checkpoint_path: str = ""  # start from this nanot5 checkpoint or HF directory's weights
    compile: bool = False  # torch.compile the training forward
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    attention: str = "auto"  # eager | sdpa | flex | auto (CUDA: flex; CPU: eager to train, sdpa to evaluate)
    lm_head_init: str = "scaled"  # untied lm_head init std: scaled (d_model**-0.5) | hf (1.0, as HF and nanoT5)

    def __post_init__(self):
        from nanot5.model import T5Config

        _check_choice("model.attention", self.attention, ("eager", "sdpa", "flex", "auto"))
        _check_choice("model.lm_head_init", self.lm_head_init, ("scaled", "hf"))

        valid = {f.name for f in fields(T5Config)}
        for key in self.overwrite:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=3)
                hint = f"; did you mean {' or '.join('model.overwrite.' + c for c in close)}?" if close else ""
                raise ConfigError(f"unknown config key 'model.overwrite.{key}' (not a T5Config field){hint}")


@dataclass(frozen=True)
class TokenizerConfig:
    # HF name, local folder, spiece.model, `demo` (trained and cached), or "" for model.name's tokenizer
    name: str = "google/t5-v1_1-base"


@dataclass(frozen=True)
class DataConfig:
    source: str = "c4"  # c4 | hf:NAME[:CONFIG][:SPLIT] | demo | local path/dir/glob | sni
    validation_source: str = ""  # default: the validation split of `source`
    text_column: str = "text"
    input_length: int = 512
    mlm_probability: float = 0.15
    mean_noise_span_length: float = 3.0
    num_workers: int = 2
    # logical readers (shards of the corpus) over all processes; 0: world_size * max(1, num_workers).
    # Fix it to get the same batches, and exact resume, with any number of processes and workers.
    num_readers: int = 0
    shuffle_buffer: int = 10_000
    on_error: str = "raise"  # raise | skip (count and log malformed records)
    # Super-Natural Instructions fine-tuning (mode ft)
    sni_dir: str = "natural-instructions"
    sni_split: str = "default"
    max_seq_len: int = 1024
    max_target_len: int = 128
    max_num_instances_per_task: int = 100
    max_num_instances_per_eval_task: int = 100
    add_task_name: bool = False
    add_task_definition: bool = True
    num_pos_examples: int = 2
    num_neg_examples: int = 0
    add_explanation: bool = False
    tk_instruct: bool = False

    def __post_init__(self):
        _check_positive(self, "data", "input_length", "mean_noise_span_length", "max_seq_len",
                        "max_target_len", "shuffle_buffer")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        _check_choice("data.on_error", self.on_error, ("raise", "skip"))


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamwscale"
    base_lr: float = 2e-2
    batch_size: int = 128  # GLOBAL batch (all ranks, all micro-batches)
    total_steps: int = 65536
    epochs: int = -1  # > 0: derive total_steps from the data set size (fine-tuning)
    warmup_steps: int = 10000
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # <= 0: no clipping
    grad_acc: int = 1
    final_cosine: float = 1e-5
    skip_nonfinite: bool = False  # skip steps with a non-finite loss instead of stopping

    def __post_init__(self):
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_positive(self, "optim", "base_lr", "batch_size", "grad_acc")
        if self.total_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set optim.total_steps or optim.epochs to a positive number")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.batch_size % self.grad_acc:
            raise ConfigError(
                f"optim.batch_size={self.batch_size} is not divisible by optim.grad_acc={self.grad_acc}: "
                "the global batch is split into grad_acc equal micro-batches")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 100_000
    steps: int = 500  # held-out batches per evaluation
    batch_size: int = 0  # 0: same as the training micro-batch


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100_000
    keep: int = 2

    def __post_init__(self):
        _check_positive(self, "checkpoint", "every_steps", "keep")


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 100
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "nanot5"
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines
    peak_tflops: float = 0.0  # device peak for MFU; 0: known GPU table, or measured on CPU

    def __post_init__(self):
        _check_positive(self, "logging", "every_steps")
        _check_choice("logging.progress", self.progress, ("auto", "bar", "lines"))


@dataclass(frozen=True)
class RunConfig:
    dir: str = ""  # default runs/<timestamp>


@dataclass(frozen=True)
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp (only used under torchrun with >1 process)

    def __post_init__(self):
        _check_choice("distributed.strategy", self.strategy, ("ddp", "fsdp"))


@dataclass(frozen=True)
class Config:
    mode: str = "pt"  # pt: span-corruption pre-training; ft: SNI fine-tuning
    preset: str = ""
    seed: int = 2137
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"
    resume: str = ""  # "" | auto | path to a checkpoint directory
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_choice("precision", self.precision, PRECISIONS)

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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if value is None:
            return ""
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
        elif key == "overwrite":
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
    tree = load_preset(base) if base else {}
    _merge(tree, data)
    return tree


def load_config(overrides: list[str] | None = None, *, default_preset: str = "",
                **defaults: Any) -> Config:
    """Build a Config from `preset=`, `config=FILE` and `key=value` arguments (applied in that order).

    Values are parsed as YAML scalars (`1e-2`, `true`, `null`); `defaults` are dotted keys applied
    before the preset (e.g. mode="ft").
    """
    pairs: list[tuple[str, Any]] = []
    for arg in overrides or []:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {arg!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    preset = next((str(v) for k, v in pairs if k == "preset"), default_preset)
    tree: dict[str, Any] = {}
    for key, value in defaults.items():
        _merge(tree, _nest(key, value))
    if preset:
        _merge(tree, load_preset(preset))
        tree["preset"] = preset
    for key, value in pairs:
        if key == "config":
            _merge(tree, read_yaml(value))
    for key, value in pairs:
        if key in ("preset", "config"):
            continue
        _merge(tree, _nest(key, value))
    return _build(Config, tree)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a saved config (config.yaml of a run or checkpoint), validating it."""
    tree: dict[str, Any] = {}
    _merge(tree, d)
    return _build(Config, tree)


def read_config(path: str | Path) -> Config:
    return config_from_dict(read_yaml(path))

