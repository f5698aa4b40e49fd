"""Evaluation: held-out span-corruption loss/accuracy, and SNI generation scored with the official metric.

    nanot5 evaluate model=DIR [data.validation_source=...] [eval.steps=N] [out=FILE]
    nanot5 predict  model=DIR [data.sni_dir=DIR] [out=DIR]
    nanot5 export   checkpoint=PATH out=DIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from nanot5 import distributed
from nanot5.config import Config, ConfigError, load_config


@torch.no_grad()
def heldout_metrics(model, batches: Iterable[dict[str, torch.Tensor]], *, amp=None,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean token NLL (nats) and next-token accuracy over all target tokens of `batches`.

    Sums are reduced across ranks, so every process reports the same numbers over the union of the
    ranks' batches.
    """
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        if not distributed.any_rank(batch is not None, device):
            break  # every rank is done (ranks may hold different numbers of batches)
        counted = batch is not None
        if not counted:  # this rank is done but others are not: keep FSDP's collectives in step
            batch = last
            if batch is None:
                raise ValueError("held-out evaluation: this rank got no batch at all (too little data per rank)")
        last = batch
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        labels = batch["labels"]
        with amp or contextlib.nullcontext():
            logits = model(**batch).logits  # (B, T, V)
        if not counted:
            continue
        logits = logits.float()
        valid = labels != -100
        nll += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        correct += ((logits.argmax(-1) == labels) & valid).sum()
        count += valid.sum()
    for t in (nll, correct, count):
        distributed.all_reduce_sum(t)
    if count.item() == 0:
        raise ValueError("held-out evaluation saw no target tokens (empty validation source?)")
    return {"loss": (nll / count).item(), "accuracy": (correct / count).item(), "tokens": int(count.item())}


def unigram_entropy(source: str, tokenizer, *, split: str = "validation", max_docs: int = 2000,
                    text_column: str = "text") -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of a model that ignores context.

    A pre-trained model's held-out loss should sit well below it.
    """
    import math
    from collections import Counter

    from nanot5.data.sources import open_source

    docs = []
    for _, text in open_source(source, split=split, text_column=text_column).documents():
        docs.append(text)
        if len(docs) == max_docs:
            break
    counts = Counter()
    for ids in tokenizer.encode_batch(docs):
        counts.update(ids + [tokenizer.eos_id])
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@torch.no_grad()
def generate_texts(model, tokenizer, sources: list[str], *, batch_size: int, max_source_length: int,
                   max_new_tokens: int, device: torch.device | str = "cpu", amp=None,
                   progress: bool = True) -> list[str]:
    """Greedy generations for `sources`, batched by similar length to limit padding (order preserved)."""
    hf = tokenizer.hf
    encoded = hf(sources, max_length=max_source_length, truncation=True)["input_ids"]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(sources)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), desc="generating", unit="ex", leave=False)
    was_training = model.training
    model.eval()
    for idx in batches:
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, :len(encoded[i])] = 1
        with amp or contextlib.nullcontext():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_id)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row].cpu(), skip_special_tokens=True)
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    model.train(was_training)
    return outputs


def predict_sni(model, tokenizer, cfg: Config, *, out_dir: Path | None, device, batch_size: int = 0,
                print_table: bool = True) -> dict[str, float]:
    """Generate for the SNI test tasks; write predictions.jsonl and metrics.json; return the metrics."""
    from nanot5.data.sni import load_sni
    from nanot5.metrics import evaluate_sni
    from nanot5.train import sni_collator

    records = load_sni(cfg.data.sni_dir, "test", split=cfg.data.sni_split,
                       max_num_instances_per_task=cfg.data.max_num_instances_per_eval_task)
    collator = sni_collator(cfg, tokenizer, seed=cfg.seed)
    sources = [collator.source(r) for r in records]
    preds = generate_texts(model, tokenizer, sources, batch_size=batch_size or max(8, cfg.optim.batch_size),
                           max_source_length=cfg.data.max_seq_len, max_new_tokens=cfg.data.max_target_len,
                           device=device)
    metrics = evaluate_sni(preds, [r["references"] for r in records], [r["task"] for r in records],
                           [r["categories"][0] if r["categories"] else "" for r in records],
                           print_table=print_table and out_dir is not None)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "predictions.jsonl").open("w") as f:
            for r, p in zip(records, preds):
                f.write(json.dumps({"id": r["id"], "task": r["task"], "prediction": p,
                                    "references": r["references"]}, ensure_ascii=False) + "\n")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ------------------------------------------------------------------- CLI
def _split_args(argv: list[str], own: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    mine, rest = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in own:
            mine[key] = value
        else:
            rest.append(arg)
    return mine, rest


def load_model_dir(path: str, device) -> tuple[Any, Any]:
    """A model (and its tokenizer, when the directory has one) from an HF-format dir, a run dir or a checkpoint."""
    from nanot5.checkpoint import load_checkpoint
    from nanot5.config import config_from_dict
    from nanot5.data.tokenizer import load_tokenizer
    from nanot5.model import T5

    p = Path(path)
    if (p / "final" / "config.json").is_file():  # a run directory
        p = p / "final"
    tokenizer = None
    if (p / "meta.json").is_file():  # a nanot5 checkpoint
        import yaml

        from nanot5.train import build_model, build_tokenizer

        ckpt = load_checkpoint(p)
        cfg = config_from_dict(yaml.safe_load(ckpt["config_yaml"]))
        tokenizer = build_tokenizer(cfg)
        # the architecture from the checkpoint's config, the weights from the checkpoint itself
        arch = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=True, checkpoint_path=""))
        model = build_model(arch, len(tokenizer))
        model.load_state_dict(ckpt["model"])
    else:
        model = T5.from_hf(str(p))
        if (p / "tokenizer_config.json").is_file() or (p / "spiece.model").is_file():
            tokenizer = load_tokenizer(p)
    return model.to(device).eval(), tokenizer


def evaluate_main(argv: list[str]) -> int:
    """`nanot5 evaluate model=DIR [data.validation_source=SPEC] [eval.steps=N] [out=FILE] [key=value ...]`."""
    mine, rest = _split_args(argv, ("model", "out"))
    if "model" not in mine:
        raise ConfigError("nanot5 evaluate needs model=DIR (an HF-format directory, run directory or checkpoint)")
    cfg = load_config(rest, mode="pt", **{"eval.steps": 50, "optim.batch_size": 16, "precision": "fp32"})
    device = distributed.resolve_device(cfg.device)
    model, tokenizer = load_model_dir(mine["model"], device)
    if tokenizer is None:
        from nanot5.train import build_tokenizer

        tokenizer = build_tokenizer(cfg)
    from nanot5.data.loader import PretrainLoader
    from nanot5.train import autocast_context

    loader = PretrainLoader(source=cfg.data.validation_source or cfg.data.source, split="validation",
                            tokenizer=tokenizer, input_length=cfg.data.input_length,
                            noise_density=cfg.data.mlm_probability,
                            mean_noise_span_length=cfg.data.mean_noise_span_length,
                            batch_size=cfg.eval.batch_size or cfg.optim.batch_size, seed=cfg.seed,
                            text_column=cfg.data.text_column, on_error=cfg.data.on_error,
                            num_workers=0, shuffle_buffer=1, infinite=False, max_batches=cfg.eval.steps)
    metrics = heldout_metrics(model, loader, amp=autocast_context(cfg.precision, device), device=device)
    out = Path(mine.get("out") or Path(mine["model"]) / "eval_results.json")
    result = {"model": mine["model"], "validation_source": cfg.data.validation_source or cfg.data.source,
              "eval_steps": cfg.eval.steps, **metrics}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out loss {metrics['loss']:.4f} | accuracy {metrics['accuracy']:.4f} | "
          f"{metrics['tokens']} target tokens -> {out}")
    return 0


def predict_main(argv: list[str]) -> int:
    """`nanot5 predict model=DIR [data.sni_dir=DIR] [data.sni_split=default] [out=DIR] [key=value ...]`."""
    mine, rest = _split_args(argv, ("model", "out", "batch_size"))
    if "model" not in mine:
        raise ConfigError("nanot5 predict needs model=DIR (an HF-format directory, run directory or checkpoint)")
    cfg = load_config(rest, default_preset="sni", mode="ft")
    device = distributed.resolve_device(cfg.device)
    model, tokenizer = load_model_dir(mine["model"], device)
    if tokenizer is None:
        from nanot5.train import build_tokenizer

        tokenizer = build_tokenizer(cfg)
    out = Path(mine.get("out") or Path(mine["model"]) / "predictions")
    metrics = predict_sni(model, tokenizer, cfg, out_dir=out, device=device,
                          batch_size=int(mine.get("batch_size", 0)))
    print(f"exact match {metrics['exact_match']:.2f} | ROUGE-L {metrics['rougeL']:.2f} -> {out}")
    return 0


def export_main(argv: list[str]) -> int:
    """`nanot5 export checkpoint=PATH out=DIR`: a nanot5 checkpoint -> HF format (+ tokenizer files)."""
    mine, rest = _split_args(argv, ("checkpoint", "out"))
    if rest or "checkpoint" not in mine or "out" not in mine:
        raise ConfigError("usage: nanot5 export checkpoint=PATH out=DIR")
    model, tokenizer = load_model_dir(mine["checkpoint"], "cpu")
    out = Path(mine["out"])
    model.save_hf(out)
    if tokenizer is not None:
        tokenizer.save(out)
    print(f"exported {mine['checkpoint']} -> {out} (HF T5ForConditionalGeneration format)")
    return 0
