"""Hugging Face interop: one name-mapping table between HF T5 state dicts and ours.

Our modules fuse q/k/v (self-attention), k/v (cross-attention) and wi_0/wi_1 (gated FFN) into
single matrices, so a table row maps one of our tensors to the HF tensors concatenated along
dim 0 to form it. Loading concatenates, saving splits; nothing else differs.

Output head semantics (transformers 5, models/{t5,mt5,umt5}): two separate questions.
- Scaling (d_model**-0.5 on the decoder output, `T5Config.scale_decoder_outputs`): model_type
  "t5" scales iff its config says `scale_decoder_outputs` (transformers >= 5 writes it), else iff
  `tie_word_embeddings` is not false (transformers 4 configs: original T5 leaves the key out, v1.1,
  Flan-T5 and byT5 say false). model_type "mt5" never scales, whatever its config says.
- Tying (`T5Config.tie_word_embeddings`): transformers 5 forces `tie_word_embeddings: true` into
  every T5/mT5 config and decides from the weights: a checkpoint without `lm_head.weight` (or with
  one equal to the embedding) is tied, one with a different `lm_head.weight` is untied. `load_hf`
  does the same; from the config alone (`config_from_hf`) we guess: transformers-5 T5 configs are
  tied iff scaled (original T5 vs v1.1), others as their `tie_word_embeddings` says.
So an mT5 directory saved by transformers 5 (tie true, no lm_head) is tied and unscaled, the hub's
mT5 (tie false, an lm_head) untied and unscaled.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from nanot5.model import T5, T5Config

CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                 "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
                 "dropout_rate", "layer_norm_epsilon", "feed_forward_proj", "tie_word_embeddings",
                 "scale_decoder_outputs", "pad_token_id", "eos_token_id", "decoder_start_token_id")
# HF's defaults for keys that old config.json files leave out
# (tie_word_embeddings and scale_decoder_outputs: see _head_semantics)
HF_DEFAULTS = {"relative_attention_max_distance": 128, "feed_forward_proj": "relu",
               "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
               "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6}
MT5_DEFAULTS = {**HF_DEFAULTS, "feed_forward_proj": "gated-gelu"}
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
# Present in some HF checkpoints but unused by the model (original T5 stores a relative bias in the
# first decoder cross-attention; embed_tokens duplicate `shared`).
IGNORED_HF_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                   "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def name_table(cfg: T5Config) -> list[tuple[str, list[str]]]:
    """(our name, [HF names concatenated along dim 0]) for every tensor of a model with `cfg`."""
    wi = ["wi_0", "wi_1"] if cfg.is_gated else ["wi"]
    table = [
        ("shared.weight", ["shared.weight"]),
        ("encoder.rel_bias.weight", ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]),
        ("decoder.rel_bias.weight", ["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]),
        ("encoder.final_norm.weight", ["encoder.final_layer_norm.weight"]),
        ("decoder.final_norm.weight", ["decoder.final_layer_norm.weight"]),
    ]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head.weight", ["lm_head.weight"]))
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        ffn_layer = 2 if stack == "decoder" else 1
        for i in range(n):
            ours, hf = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            table += [
                (ours + "attn_norm.weight", [hf + "0.layer_norm.weight"]),
                (ours + "attn.qkv.weight", [hf + f"0.SelfAttention.{m}.weight" for m in "qkv"]),
                (ours + "attn.o.weight", [hf + "0.SelfAttention.o.weight"]),
                (ours + "ffn_norm.weight", [hf + f"{ffn_layer}.layer_norm.weight"]),
                (ours + "ffn.wi.weight", [hf + f"{ffn_layer}.DenseReluDense.{m}.weight" for m in wi]),
                (ours + "ffn.wo.weight", [hf + f"{ffn_layer}.DenseReluDense.wo.weight"]),
            ]
            if stack == "decoder":
                table += [
                    (ours + "cross_norm.weight", [hf + "1.layer_norm.weight"]),
                    (ours + "cross.q.weight", [hf + "1.EncDecAttention.q.weight"]),
                    (ours + "cross.kv.weight", [hf + f"1.EncDecAttention.{m}.weight" for m in "kv"]),
                    (ours + "cross.o.weight", [hf + "1.EncDecAttention.o.weight"]),
                ]
    return table


# ------------------------------------------------------------------ config
def config_from_hf(config: str | Path | dict[str, Any]) -> T5Config:
    """T5Config from an HF config (dict, config.json path, or a directory holding config.json)."""
    source = "config dict"
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no HF config.json at {path}")
        source = str(path)
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type == "umt5" or any(a.startswith("UMT5") for a in archs):
        raise ValueError(
            f"{source}: UMT5 is not supported: it learns a relative position bias in every layer, "
            "nanot5 one per stack; T5, T5 v1.1, Flan-T5, mT5 and byT5 checkpoints load")
    known_arch = any(a.startswith(("T5", "MT5")) for a in archs) if archs else False
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not known_arch):
        raise ValueError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            f"nanot5 loads T5 encoder-decoders (model_type in {SUPPORTED_MODEL_TYPES}, "
            "e.g. T5ForConditionalGeneration)")
    defaults = MT5_DEFAULTS if model_type == "mt5" else HF_DEFAULTS
    values = {}
    for key in CONFIG_FIELDS:
        if key in ("tie_word_embeddings", "scale_decoder_outputs"):
            continue
        if key in config and config[key] is not None:
            values[key] = config[key]
        elif key in defaults:
            values[key] = defaults[key]
        elif key != "num_decoder_layers":
            raise KeyError(f"{source}: missing required key {key!r}")
    values["tie_word_embeddings"], values["scale_decoder_outputs"] = _head_semantics(config, model_type)
    return T5Config(**values)


def _head_semantics(config: dict[str, Any], model_type: str) -> tuple[bool, bool]:
    """(tied, scaled) of an HF config as transformers 5 reads it (see the module docstring)."""
    tie_flag = config.get("tie_word_embeddings")
    if model_type == "mt5":  # modeling_mt5: never rescales; MT5Config forces tie (weights decide)
        return tie_flag is not False, False
    if config.get("scale_decoder_outputs") is not None:  # written by transformers >= 5
        scaled = bool(config["scale_decoder_outputs"])
        return scaled, scaled  # its tie flag is always true: guess original T5 vs v1.1
    scaled = tie_flag is not False  # configuration_t5: a missing key means original T5
    return scaled, scaled


def tie_from_weights(cfg: T5Config, hf: dict[str, torch.Tensor]) -> T5Config:
    """`cfg` with tie_word_embeddings decided by the checkpoint, as transformers 5 does: tied when
    it has no lm_head.weight, untied when its lm_head.weight differs from the embedding."""
    head = hf.get("lm_head.weight")
    shared = next((hf[k] for k in ("shared.weight", "encoder.embed_tokens.weight",
                                   "decoder.embed_tokens.weight") if k in hf), None)
    if head is None:
        tied = True
    else:  # torch .bin files of tied models store both names: tied if the config says so
        tied = cfg.tie_word_embeddings and shared is not None and torch.equal(head, shared)
    return T5Config(**{**cfg.to_dict(), "tie_word_embeddings": tied})


def config_to_hf(cfg: T5Config) -> dict[str, Any]:
    """HF config dict. transformers 5 reads the head semantics back exactly (scale from
    `scale_decoder_outputs`, tying from the weights `save_hf` writes). transformers 4 ignores
    `scale_decoder_outputs` and scales iff tied, so it misreads tied-unscaled models (mT5 as
    transformers 5 saves it) and untied-scaled ones."""
    out = {k: getattr(cfg, k) for k in CONFIG_FIELDS}
    out.update(architectures=["T5ForConditionalGeneration"], model_type="t5",
               is_encoder_decoder=True, use_cache=True, initializer_factor=1.0)
    return out


# ----------------------------------------------------------- state dicts
def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: T5Config, source: str = "state dict"
                       ) -> dict[str, torch.Tensor]:
    """Our state dict from an HF one; errors name every missing key."""
    hf = dict(hf)
    if "shared.weight" not in hf:  # some exports keep only one of the tied copies
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in hf:
                hf["shared.weight"] = hf[alias]
                break
    if not cfg.tie_word_embeddings and "lm_head.weight" not in hf and "shared.weight" in hf:
        # an untied model saved while its head shared storage with the embedding (transformers >= 5
        # ties them at construction): the head is a copy of the table
        hf["lm_head.weight"] = hf["shared.weight"]
    table = name_table(cfg)
    missing = [h for _, hs in table for h in hs if h not in hf]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise KeyError(f"{source}: missing {len(missing)} T5 weight(s): {shown}")
    used = {h for _, hs in table for h in hs} | set(IGNORED_HF_KEYS)
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(set(hf) - used)
    if unexpected:
        warnings.warn(f"{source}: ignoring {len(unexpected)} unexpected key(s): {unexpected[:8]}")
    return {ours: torch.cat([hf[h] for h in hs], dim=0) if len(hs) > 1 else hf[hs[0]]
            for ours, hs in table}


def to_hf_state_dict(model: T5) -> dict[str, torch.Tensor]:
    """HF `T5ForConditionalGeneration` state dict (fused tensors split back)."""
    ours = model.state_dict()
    out = {}
    for name, hs in name_table(model.config):
        for h, part in zip(hs, ours[name].chunk(len(hs), dim=0)):
            out[h] = part.detach().contiguous().clone()
    return out


# -------------------------------------------------------------- loading
def resolve_dir(path_or_name: str | Path) -> Path:
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path}: expected an HF model directory (config.json + weights)")
        return path
    name = str(path_or_name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model directory {name} does not exist")
    try:  # a hub name such as google/t5-v1_1-base
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(f"{name} is not a local directory and huggingface_hub is missing") from e
    try:
        return Path(snapshot_download(name, allow_patterns=[
            "config.json", "*.safetensors", "*.bin", "*.index.json", "spiece.model",
            "tokenizer*.json", "special_tokens_map.json"]))
    except Exception as e:  # offline, unknown repo, ...
        raise FileNotFoundError(f"{name} is not a local directory and could not be fetched from the "
                                f"Hugging Face hub ({type(e).__name__}: {e})") from e


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""
    for fname in WEIGHT_FILES:
        path = model_dir / fname
        if not path.is_file():
            continue
        if fname.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_weight_file(model_dir / shard))
            return state
        return _read_weight_file(path)
    raise FileNotFoundError(f"{model_dir}: no model weights found (looked for {', '.join(WEIGHT_FILES)})")


def load_hf(path_or_name: str | Path, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None, **config_overrides: Any) -> T5:
    """Load an HF T5ForConditionalGeneration directory or hub name as a nanot5 `T5`."""
    model_dir = resolve_dir(path_or_name)
    cfg = config_from_hf(model_dir)  # first: an unsupported architecture fails before reading weights
    weights = read_hf_weights(model_dir)
    cfg = tie_from_weights(cfg, weights)
    if config_overrides:
        cfg = T5Config(**{**cfg.to_dict(), **config_overrides})
    state = from_hf_state_dict(weights, cfg, source=str(model_dir))
    with torch.device("meta"):
        model = T5(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model
    return model


def save_hf(model: T5, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors (each file replaced atomically)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    _atomic_write(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(config_to_hf(model.config), indent=2) + "\n"
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(text))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

