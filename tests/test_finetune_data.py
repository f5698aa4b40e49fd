"""Fine-tuning on any seq2seq data through the CLI (issue 13): a synthetic task learned to >= 90% exact match,
predictions with beam search, best-checkpoint selection, and starts from save_hf and pre-training outputs."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

import pytest
import torch

from nanot5.data.tokenizer import load_tokenizer
from nanot5.model import T5, T5Config
from nanot5.tracking import read_metrics
from tests.test_train import run_cli, tiny_args

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def write_dates(folder: Path, n_train: int = 2000, n_val: int = 200) -> tuple[Path, Path]:
    """A task with structure to learn: a date in one of three written forms -> ISO 8601 (month names to
    numbers, zero padding, reordering), on disjoint dates."""
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < n_train + n_val:
        d = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
        m = MONTHS[d.month - 1]
        text = [f"{m} {d.day}, {d.year}", f"{d.day} {m} {d.year}", f"{d.year}, {m} {d.day}"][rng.randrange(3)]
        if d not in seen:
            seen.add(d)
            rows.append({"date": text, "iso": d.isoformat()})
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.jsonl", folder / "valid.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return train, val


def small_start(folder: Path, tokenizer_dir: Path) -> Path:
    """A random-init small T5 v1.1 saved in HF format with the T5 tokenizer (what `save_hf` users start from)."""
    torch.manual_seed(0)
    T5(T5Config.from_name("t5-v1_1-tiny", d_model=128, d_ff=256, num_heads=4, d_kv=32, num_layers=3)).save_hf(folder)
    load_tokenizer(tokenizer_dir).save(folder)
    return folder


def finetune_args(start: Path, train: Path, val: Path, run: Path, *extra: str) -> list[str]:
    return ["finetune", f"model.name={start}", f"data.source={train}", f"data.validation_source={val}",
            "data.template=iso date: {date}", "data.target_column=iso", "optim.name=adamwscale",
            "optim.base_lr=1e-2", "optim.batch_size=32", "optim.warmup_steps=30", "optim.lr_scheduler=cosine",
            "model.overwrite.dropout_rate=0.0", "data.max_seq_len=32", "data.max_target_len=16",
            "logging.tensorboard=false", "logging.every_steps=50", f"run.dir={run}", *extra]


@pytest.mark.slow
def test_finetune_learns_a_seq2seq_task_and_predict_scores_it(t5_tokenizer_dir, tmp_path):
    train, val = write_dates(tmp_path / "data")
    start = small_start(tmp_path / "start", t5_tokenizer_dir)
    run = tmp_path / "run"
    res = run_cli(finetune_args(start, train, val, run, "optim.epochs=6", "eval.every_steps=125",
                                "eval.generate=true", "eval.metrics=exact_match,accuracy",
                                "checkpoint.best_metric=exact_match"))
    assert res.returncode == 0, res.stderr[-3000:]
    evals = [e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval"]
    assert evals[0]["exact_match"] == 0.0 and max(e["exact_match"] for e in evals) >= 90.0, evals
    # teacher-forced token accuracy (a fraction) and the generation metric `accuracy` (percent) keep their own keys
    assert all(0.0 <= e["token_accuracy"] <= 1.0 for e in evals) and max(e["accuracy"] for e in evals) >= 90.0
    summary = json.loads((run / "summary.json").read_text())
    best = max(evals, key=lambda e: e["exact_match"])
    assert summary["best_step"] == best["step"] and summary["best_value"] == best["exact_match"]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and {"id", "input", "target", "prediction"} <= set(rows[0])
    assert rows[0]["input"].startswith("iso date: ")

    # the final model (= the best) through `nanot5 predict`, with beam search
    out = tmp_path / "pred"
    pred = run_cli(["predict", f"model={run}", f"data.source={train}", f"data.validation_source={val}",
                    "data.template=iso date: {date}", "data.target_column=iso", "eval.metrics=exact_match,bleu",
                    "generate.num_beams=4", f"out={out}"])
    assert pred.returncode == 0, pred.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_match"] >= 90.0 and metrics["bleu"] > 50.0, metrics


def test_finetune_from_save_hf_and_from_a_pretraining_run(test_data, t5_tokenizer_dir, tmp_path):
    train, val = write_dates(tmp_path / "data", n_train=64, n_val=16)
    # from a save_hf directory
    start = small_start(tmp_path / "start", t5_tokenizer_dir)
    res = run_cli(finetune_args(start, train, val, tmp_path / "a", "optim.total_steps=2", "optim.warmup_steps=0",
                                "optim.epochs=-1", "optim.batch_size=8"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    # from a nanot5 pre-training run's final/
    pt = tmp_path / "pt"
    assert run_cli(tiny_args(test_data, pt, "optim.total_steps=2", "checkpoint.every_steps=2",
                             "eval.every_steps=2")).returncode == 0
    res = run_cli(finetune_args(pt / "final", train, val, tmp_path / "b", "optim.total_steps=2",
                                "optim.warmup_steps=0", "optim.epochs=-1", "optim.batch_size=8",
                                "data.batching=packed"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("override,message", [
    ("data.target_column=answer", "answer"),
    ("data.template=iso date: {when}", "when"),
])
def test_bad_fine_tuning_data_is_one_clear_line(t5_tokenizer_dir, tmp_path, override, message):
    train, val = write_dates(tmp_path / "data", n_train=16, n_val=4)
    start = small_start(tmp_path / "start", t5_tokenizer_dir)
    res = run_cli(finetune_args(start, train, val, tmp_path / "run", "optim.total_steps=2", "optim.warmup_steps=0",
                                "optim.epochs=-1", "optim.batch_size=8", override))
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
