"""SNI fine-tuning end to end on the staged SNI subset: train tasks -> predict test tasks -> official metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanot5.data.tokenizer import load_tokenizer
from nanot5.metrics import compute_metrics
from nanot5.model import T5, T5Config
from tests.test_train import run_cli

SMALL = ["data.sni_split=seen", "data.max_seq_len=256", "data.max_target_len=24",
         "data.max_num_instances_per_eval_task=15", "logging.tensorboard=false"]


def seen_task_split(sni: Path, out: Path) -> Path:
    """An SNI layout whose train and test tasks are the same staged test tasks on disjoint instances.

    A tiny model trained from scratch for a minute cannot transfer to unseen tasks, but it does learn
    the answer formats of seen ones (Tk-Instruct's seen-task setting): instances 30-99 of each task
    become `<task>_train`, instances 0-14 `<task>_test`.
    """
    (out / "tasks").mkdir(parents=True)
    (out / "splits" / "seen").mkdir(parents=True)
    names = (sni / "splits" / "small" / "test_tasks.txt").read_text().split()
    for name in names:
        task = json.loads((sni / "tasks" / f"{name}.json").read_text())
        for part, instances in (("train", task["Instances"][30:]), ("test", task["Instances"][:15])):
            (out / "tasks" / f"{name}_{part}.json").write_text(json.dumps({**task, "Instances": instances}))
    for part in ("train", "test"):
        (out / "splits" / "seen" / f"{part}_tasks.txt").write_text("".join(f"{n}_{part}\n" for n in names))
    return out


@pytest.mark.slow
def test_finetune_improves_rouge_on_sni_test_tasks(test_data, tmp_path):
    torch.manual_seed(0)
    start = tmp_path / "random-tiny"
    T5(T5Config.from_name("t5-v1_1-tiny", d_model=128, d_ff=256, num_heads=4, d_kv=32)).save_hf(start)
    load_tokenizer(test_data / "t5-tokenizer").save(start)
    sni = [f"data.sni_dir={seen_task_split(test_data / 'sni', tmp_path / 'sni')}", *SMALL]

    before = run_cli(["predict", f"model={start}", f"out={tmp_path / 'before'}", *sni])
    assert before.returncode == 0, before.stderr
    rouge_before = json.loads((tmp_path / "before" / "metrics.json").read_text())["rougeL"]

    run = tmp_path / "ft"
    ft = run_cli(["finetune", f"model.name={start}", "optim.base_lr=1e-3", "optim.epochs=2",
                  "optim.batch_size=16", f"run.dir={run}", "model.overwrite.dropout_rate=0.0", *sni])
    assert ft.returncode == 0, ft.stderr + ft.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7 * 15 and {"id", "task", "prediction", "references"} <= set(preds[0])
    # the file's numbers are the official metric of the file's predictions
    again = compute_metrics([p["prediction"] for p in preds], [p["references"] for p in preds])
    assert again["rougeL"] == metrics["rougeL"] and again["exact_match"] == metrics["exact_match"]
    assert any(k.startswith("rougeL_for_task1393") for k in metrics)
    assert any(k == "rougeL_for_data_to_text" for k in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rougeL"] == metrics["rougeL"]
    assert metrics["rougeL"] > rouge_before, (rouge_before, metrics["rougeL"])
    assert (run / "final" / "model.safetensors").is_file()
