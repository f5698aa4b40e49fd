"""Evaluation: held-out span-corruption loss/accuracy, what a model fills in, SNI generation scored with the
official metric, and HF export.

    nanot5 evaluate model=DIR [data.validation_source=...] [eval.steps=N] [out=FILE]
    nanot5 predict  model=DIR [data.sni_dir=DIR] [out=DIR] [batch_size=N]
    nanot5 export   checkpoint=PATH out=DIR
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from nanot5 import distributed, faults
from nanot5.build import autocast_context, build_tokenizer, load_model_dir
from nanot5.config import Config, ConfigError, load_config
from nanot5.fileio import atomic_write, atomic_write_text
from nanot5.log import info

EXPORT_MARKER = "nanot5_export.json"  # written into every HF folder nanot5 writes (final/, exports)


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
        faults.point("eval")
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
                    text_column: str = "text", on_error: str = "raise") -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of a model that ignores context.

    A pre-trained model's held-out loss should sit well below it.
    """
    import math
    from collections import Counter

    from nanot5.data.sources import open_source

    docs = []
    for _, text in open_source(source, split=split, text_column=text_column, on_error=on_error).documents():
        docs.append(text)
        if len(docs) == max_docs:
            break
    counts = Counter()
    for ids in tokenizer.encode_batch(docs):
        counts.update(ids + [tokenizer.eos_id])
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


# ---------------------------------------------------------------- samples
def _spans(ids: list[int], tokenizer) -> tuple[list[list[int]], list[int]]:
    """Split span-corruption ids at sentinels: (pieces between sentinels, sentinel numbers k in order)."""
    first = tokenizer.sentinel_id(0)
    last = first - tokenizer.num_sentinels + 1
    pieces, marks = [[]], []
    for i in ids:
        if i in (tokenizer.eos_id, tokenizer.pad_id, -100):
            if i == tokenizer.eos_id:
                break
            continue
        if last <= i <= first:
            marks.append(first - i)
            pieces.append([])
        else:
            pieces[-1].append(i)
    return pieces, marks


def _by_sentinel(ids: list[int], tokenizer) -> dict[int, list[int]]:
    """Targets `<X0> span <X1> span ...` -> {k: ids of span k}."""
    pieces, marks = _spans(ids, tokenizer)
    return dict(zip(marks, pieces[1:]))


@torch.no_grad()
def fill_in_samples(model, tokenizer, batches: Iterable[dict[str, torch.Tensor]], *, amp=None,
                    device: torch.device | str = "cpu", num: int = 3, max_spans: int = 5) -> str:
    """A few held-out examples with their masked spans: the truth next to what the model fills in
    (greedy), so a person sees the model working, not only a loss."""
    batch = next(iter(batches))
    inputs, labels = batch["input_ids"][:num], batch["labels"][:num]
    was_training = model.training
    model.eval()
    try:
        with amp or contextlib.nullcontext():
            out = model.generate(inputs.to(device), max_new_tokens=labels.shape[1])
    finally:
        model.train(was_training)
    blocks = []
    for row in range(inputs.shape[0]):
        pieces, marks = _spans(inputs[row].tolist(), tokenizer)
        text = tokenizer.decode(pieces[0])
        for k, piece in zip(marks, pieces[1:]):
            text += f" [{k}] " + tokenizer.decode(piece)
        truth = _by_sentinel(labels[row].tolist(), tokenizer)
        guess = _by_sentinel(out[row].tolist(), tokenizer)
        lines = [f"sample {row + 1}: {text[:400]}{' ...' if len(text) > 400 else ''}"]
        for k in marks[:max_spans]:
            lines.append(f"  [{k}] truth: {tokenizer.decode(truth.get(k, []))!r:<28} "
                         f"model: {tokenizer.decode(guess.get(k, []))!r}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# -------------------------------------------------------------- generation
@torch.no_grad()
def generate_texts(model, tokenizer, sources: list[str], *, batch_size: int, max_source_length: int,
                   device: torch.device | str = "cpu", amp=None, progress: bool = True, generator=None,
                   **generate_kwargs) -> list[str]:
    """Generations for `sources` (T5.generate's options: greedy by default, beams, sampling), batched by
    similar length to limit padding; order preserved."""
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
            out = model.generate(ids.to(device), attention_mask=mask.to(device), eos_token_id=tokenizer.eos_id,
                                 generator=generator, **generate_kwargs)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row].cpu(), skip_special_tokens=True)
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    model.train(was_training)
    return outputs


def predict(model, tokenizer, cfg: Config, records: list[dict[str, Any]], *, device, amp=None,
            out_dir: Path | None = None, batch_size: int = 0, sni: bool = False,
            print_table: bool = False) -> dict[str, float]:
    """Generate for `records` (id, input, references; SNI: task, category) with the `generate` options and
    score them: SNI with the official metric (overall, per category, per task), anything else with
    eval.metrics. With out_dir: predictions.jsonl (id, input, target, prediction) and metrics.json."""
    from nanot5.metrics import compute_generation_metrics, evaluate_sni, format_metrics

    g = cfg.generate
    generator = None
    if g.do_sample:
        generator = torch.Generator(device).manual_seed(g.seed)
    preds = generate_texts(model, tokenizer, [r["input"] for r in records],
                           batch_size=batch_size or g.batch_size or max(8, cfg.optim.batch_size),
                           max_source_length=cfg.data.max_seq_len, device=device, amp=amp, generator=generator,
                           progress=print_table, **g.kwargs(cfg.data.max_target_len))
    refs = [r["references"] for r in records]
    if sni:
        metrics = evaluate_sni(preds, refs, [r["task"] for r in records], [r["category"] for r in records],
                               print_table=print_table)
    else:
        metrics = compute_generation_metrics(preds, refs, cfg.eval.metric_names)
        if print_table:
            print(format_metrics(metrics, len(records)))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for r, p in zip(records, preds):
            row = {"id": r["id"], "input": r["input"],
                   "target": r["references"][0] if len(r["references"]) == 1 else r["references"],
                   "prediction": p, "references": r["references"]}
            if "task" in r:
                row["task"] = r["task"]
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


# ------------------------------------------------------------------ export
def write_hf_dir(model, tokenizer, out: Path, source: str = "") -> None:
    """An HF-format folder (config.json, model.safetensors, tokenizer files) marked as written by nanot5."""
    model.save_hf(out)
    if tokenizer is not None:
        tokenizer.save(out)
    marker = json.dumps({"written_by": "nanot5", "source": source, "time": time.time()}) + "\n"
    atomic_write(out / EXPORT_MARKER, lambda tmp: Path(tmp).write_text(marker))


def check_export_target(out: Path) -> None:
    """Refuse to write into a non-empty folder that nanot5 did not write (it could be a checkpoint or a
    user's model: its files would be overwritten)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ConfigError(f"out={out} is not empty and is not an earlier nanot5 export; choose an empty or new "
                          "folder (nanot5 never overwrites files it did not write)")


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


def _help(argv: list[str], doc: str) -> bool:
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        return True
    return False


def _tokenizer_for(model_path: str, tokenizer, cfg: Config, rest: list[str]):
    """The model folder's own tokenizer, else an explicit tokenizer.name=; never a silent default."""
    if tokenizer is not None:
        return tokenizer
    if any(a.startswith("tokenizer.name=") for a in rest):
        return build_tokenizer(cfg)
    raise ConfigError(f"model={model_path} has no tokenizer files; pass tokenizer.name=NAME_OR_DIR "
                      "(the tokenizer it was trained with)")


EVALUATE_HELP = """
usage: nanot5 evaluate model=DIR [data.validation_source=SPEC] [eval.steps=N] [out=FILE] [key=value ...]

Held-out span-corruption loss and token accuracy of a model: an HF-format folder, a run folder (its final/)
or a nanot5 checkpoint. Data keys as in `nanot5 pretrain --help` (data.input_length, data.mlm_probability,
eval.batch_size, precision, device, ...). Writes out (default MODEL/eval_results.json).
"""


def evaluate_main(argv: list[str]) -> int:
    if _help(argv, EVALUATE_HELP):
        return 0
    mine, rest = _split_args(argv, ("model", "out"))
    if "model" not in mine:
        raise ConfigError("nanot5 evaluate needs model=DIR (an HF-format directory, run directory or checkpoint)")
    cfg = load_config(rest, mode="pt", **{"eval.steps": 50, "optim.batch_size": 16, "precision": "fp32"})
    device = distributed.resolve_device(cfg.device)
    model, tokenizer = load_model_dir(mine["model"], device)
    tokenizer = _tokenizer_for(mine["model"], tokenizer, cfg, rest)
    from nanot5.data.loader import PretrainLoader

    loader = PretrainLoader(source=cfg.data.validation_source or cfg.data.source, split="validation",
                            tokenizer=tokenizer, input_length=cfg.data.input_length,
                            noise_density=cfg.data.mlm_probability,
                            mean_noise_span_length=cfg.data.mean_noise_span_length,
                            batch_size=cfg.eval.batch_size or cfg.optim.batch_size, seed=cfg.seed,
                            text_column=cfg.data.text_column, on_error=cfg.data.on_error,
                            num_workers=0, shuffle_buffer=0, infinite=False, max_batches=cfg.eval.steps)
    metrics = heldout_metrics(model, loader, amp=autocast_context(cfg.precision, device), device=device)
    out = Path(mine.get("out") or Path(mine["model"]) / "eval_results.json")
    result = {"model": mine["model"], "validation_source": cfg.data.validation_source or cfg.data.source,
              "eval_steps": cfg.eval.steps, **metrics}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"held-out loss {metrics['loss']:.4f} | accuracy {metrics['accuracy']:.4f} | "
          f"{metrics['tokens']} target tokens -> {out}")
    return 0


PREDICT_HELP = """
usage: nanot5 predict model=DIR [data.source=SPEC | data.sni_dir=DIR] [generate.KEY=VALUE ...] [out=DIR]
                      [batch_size=N] [key=value ...]

Generate with a model (an HF-format folder, a run folder or a checkpoint) and score the generations.
data.source=sni (the default): the SNI test tasks, scored with the official metric (exact match, ROUGE-L; per
category and per task). Any other source (jsonl/json/csv/tsv/parquet files or hf:NAME): its validation set
(data.validation_source / data.validation_fraction / a validation split), else every record, scored with
eval.metrics (exact_match,rougeL,bleu,accuracy). Generation options: generate.num_beams, generate.length_penalty,
generate.do_sample, generate.top_k, generate.top_p, generate.temperature, ... (`nanot5 finetune --help`).
Writes predictions.jsonl (id, input, target, prediction) and metrics.json into out (default MODEL/predictions).
"""


def predict_main(argv: list[str]) -> int:
    if _help(argv, PREDICT_HELP):
        return 0
    from nanot5.data.finetune import prediction_records

    mine, rest = _split_args(argv, ("model", "out", "batch_size"))
    if "model" not in mine:
        raise ConfigError("nanot5 predict needs model=DIR (an HF-format directory, run directory or checkpoint)")
    try:
        batch_size = int(mine.get("batch_size", 0) or 0)
    except ValueError:
        raise ConfigError(f"batch_size={mine['batch_size']!r}: expected a positive integer") from None
    if "batch_size" in mine and batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size}: must be a positive integer")
    cfg = load_config(rest, default_preset="sni", mode="ft")
    device = distributed.resolve_device(cfg.device)
    model, tokenizer = load_model_dir(mine["model"], device)
    tokenizer = _tokenizer_for(mine["model"], tokenizer, cfg, rest)
    records = prediction_records(cfg, tokenizer)
    out = Path(mine.get("out") or Path(mine["model"]) / "predictions")
    sni = cfg.data.source == "sni"
    metrics = predict(model, tokenizer, cfg, records, device=device, amp=autocast_context(cfg.precision, device),
                      out_dir=out, batch_size=batch_size, sni=sni, print_table=True)
    summary = " | ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "_for_" not in k)
    print(f"{len(records)} examples: {summary} -> {out}")
    return 0


EXPORT_HELP = """
usage: nanot5 export checkpoint=PATH out=DIR

Write a nanot5 checkpoint (or run folder) as a Hugging Face T5ForConditionalGeneration folder with its
tokenizer. out must be new, empty, or an earlier nanot5 export.
"""


def export_main(argv: list[str]) -> int:
    if _help(argv, EXPORT_HELP):
        return 0
    mine, rest = _split_args(argv, ("checkpoint", "out"))
    if rest or "checkpoint" not in mine or "out" not in mine:
        raise ConfigError("usage: nanot5 export checkpoint=PATH out=DIR" + (f" (unknown: {rest})" if rest else ""))
    out = Path(mine["out"])
    check_export_target(out)
    model, tokenizer = load_model_dir(mine["checkpoint"], "cpu")
    write_hf_dir(model, tokenizer, out, source=mine["checkpoint"])
    info(f"exported {mine['checkpoint']} -> {out} (HF T5ForConditionalGeneration format)")
    return 0
