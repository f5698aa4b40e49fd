"""The training loop end to end: exact resume after SIGKILL, atomic checkpoints, gradient accumulation,
signals, non-finite losses, learning on real C4 text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanot5.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
)
from nanot5.config import load_config
from nanot5.model import T5, T5Config
from nanot5.optim import build_optimizer, param_groups
from nanot5.tracking import read_metrics
from nanot5.train import accumulate_gradients

REPO = Path(__file__).resolve().parents[1]


def tiny_args(test_data: Path, run_dir: Path, *extra: str) -> list[str]:
    c4 = test_data / "c4"
    return ["pretrain", "preset=nanot5-base", "model.name=t5-v1_1-tiny", "model.compile=false",
            f"tokenizer.name={test_data / 't5-tokenizer'}",
            f"data.source={c4 / 'c4-train.sample.jsonl.gz'}",
            f"data.validation_source={c4 / 'c4-validation.sample.jsonl.gz'}",
            "data.input_length=64", "data.shuffle_buffer=64", "data.num_workers=0", "optim.batch_size=4", "optim.warmup_steps=1",
            "eval.steps=2", "logging.every_steps=1", "logging.tensorboard=false", "precision=fp32",
            "checkpoint.keep=3", f"run.dir={run_dir}", *extra]


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "nanot5", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def start_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "nanot5", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(e["kind"], e["step"], e["loss"]) for e in read_metrics(run_dir / "metrics.jsonl")]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_auto_is_bitwise_identical(test_data, tmp_path, workers):
    common = ["optim.total_steps=40", "checkpoint.every_steps=3", "eval.every_steps=6",
              f"data.num_workers={workers}"]
    ref = run_cli(tiny_args(test_data, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr + ref.stdout

    run = tmp_path / "killed"
    proc = start_cli(tiny_args(test_data, run, *common))
    wait_for(lambda: (run / "checkpoints" / "step_0000006" / "meta.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()  # it really died before the end
    resumed = run_cli(tiny_args(test_data, run, *common, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resumed from" in resumed.stdout

    assert losses(run) == losses(tmp_path / "ref")
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KILL_MID_SAVE = """
import os, signal, sys, torch
from pathlib import Path
from nanot5 import checkpoint
real_save = torch.save
def dying_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    with open(f, "r+b") as fh:  # leave a half-written file behind, then die without cleanup
        fh.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
ck = checkpoint.load_checkpoint(Path(sys.argv[1]))
checkpoint.save_checkpoint(Path(sys.argv[2]), ck["step"] + 100, model_state=ck["model"],
                           optimizer_state=ck["optimizer"], trainer_state=ck["trainer"],
                           config_yaml=ck["config_yaml"], keep=1)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(test_data, tmp_path):
    run = tmp_path / "run"
    first = run_cli(tiny_args(test_data, run, "optim.total_steps=3", "checkpoint.every_steps=3",
                              "eval.every_steps=100"))
    assert first.returncode == 0, first.stderr
    root = run / "checkpoints"
    good = root / "step_0000003"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    died = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(good), str(root)], cwd=REPO)
    assert died.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(root)] == ["step_0000003"]  # no step_0000103
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the torn write is left aside
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert load_latest(root)["step"] == 3
    more = run_cli(tiny_args(test_data, run, "optim.total_steps=5", "checkpoint.every_steps=3",
                             "eval.every_steps=100", "resume=auto"))
    assert more.returncode == 0, more.stderr + more.stdout
    assert f"resumed from {good}" in more.stdout


def test_corrupt_checkpoint_is_skipped_by_auto_refused_by_path_and_never_overwritten(test_data, tmp_path):
    run = tmp_path / "run"
    assert run_cli(tiny_args(test_data, run, "optim.total_steps=4", "checkpoint.every_steps=2",
                             "eval.every_steps=100")).returncode == 0
    newest = run / "checkpoints" / "step_0000004"
    (newest / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_checkpoint(newest)
    bad = run_cli(tiny_args(test_data, run, "optim.total_steps=6", f"resume={newest}"))
    assert bad.returncode != 0 and "corrupt" in bad.stderr
    ok = run_cli(tiny_args(test_data, run, "optim.total_steps=6", "checkpoint.every_steps=2",
                           "eval.every_steps=100", "resume=auto"))
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "skipping unusable checkpoint" in ok.stderr and "resumed from" in ok.stdout and "step_0000002" in ok.stdout
    kept = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_0000004.old-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_bytes() == b"garbage"


def test_incompatible_checkpoint_is_refused(test_data, tmp_path):
    run = tmp_path / "run"
    assert run_cli(tiny_args(test_data, run, "optim.total_steps=2", "checkpoint.every_steps=2",
                             "eval.every_steps=100")).returncode == 0
    res = run_cli(tiny_args(test_data, run, "optim.total_steps=4", "resume=auto", "optim.name=adafactor"))
    assert res.returncode != 0 and "incompatible" in res.stderr and "optim.name" in res.stderr


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    cfg = T5Config.from_name("t5-v1_1-tiny", vocab_size=128)
    a = T5(cfg)
    b = T5(cfg)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer("adamwscale", param_groups(a, 0.0), lr=1e-2)
    opt_b = build_optimizer("adamwscale", param_groups(b, 0.0), lr=1e-2)
    amp = torch.autocast("cpu", enabled=False)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        batch = {"input_ids": torch.randint(2, 128, (8, 24), generator=g),
                 "labels": torch.randint(2, 128, (8, 7), generator=g)}
        accumulate_gradients(a, [batch], amp)
        accumulate_gradients(b, [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)], amp)
        for model, opt in ((a, opt_a), (b, opt_b)):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert ((p - q).norm() / p.norm()).item() <= 1e-5, name


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(test_data, tmp_path):
    run = tmp_path / "run"
    proc = start_cli(tiny_args(test_data, run, "optim.total_steps=100000", "eval.every_steps=100000"))
    wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and 0 < summary["steps"] < 100000
    assert load_latest(run / "checkpoints")["step"] == summary["steps"]


def test_nonfinite_loss_stops_or_skips(test_data, tmp_path):
    # AdamW at lr 1e30 blows the weights up within a couple of steps
    blow_up = ["optim.name=adamw", "optim.base_lr=1e30", "optim.lr_scheduler=constant", "optim.grad_clip=0",
               "optim.total_steps=6", "checkpoint.every_steps=1", "eval.every_steps=100"]
    stop = run_cli(tiny_args(test_data, tmp_path / "stop", *blow_up))
    assert stop.returncode == 2 and "non-finite loss" in stop.stderr
    assert load_latest(tmp_path / "stop" / "checkpoints") is not None  # earlier good checkpoint kept
    skip = run_cli(tiny_args(test_data, tmp_path / "skip", *blow_up, "optim.skip_nonfinite=true"))
    assert skip.returncode == 0, skip.stderr
    assert any(e.get("skipped_steps") for e in read_metrics(tmp_path / "skip" / "metrics.jsonl"))


def test_config_errors_from_the_cli():
    res = run_cli(["pretrain", "optim.nmae=adamw"])
    assert res.returncode == 2 and "optim.nmae" in res.stderr and "optim.name" in res.stderr
    res = run_cli(["pretrain", "optim.batch_size=7", "optim.grad_acc=2"])
    assert res.returncode == 2 and "not divisible" in res.stderr


def test_run_directory_layout_and_hf_export(test_data, tmp_path):
    run = tmp_path / "run"
    res = run_cli(tiny_args(test_data, run, "optim.total_steps=4", "checkpoint.every_steps=2",
                            "eval.every_steps=2", "logging.tensorboard=true"))
    assert res.returncode == 0, res.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer_config.json", "checkpoints/step_0000004/meta.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert load_config([f"config={run / 'config.yaml'}"]).optim.total_steps == 4
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ours = T5.from_hf(run / "final")
    ids = tok(["The quick brown fox"], return_tensors="pt").input_ids
    labels = tok(["jumps over"], return_tensors="pt").input_ids
    assert torch.allclose(hf(input_ids=ids, labels=labels).logits, ours(ids, labels=labels).logits, atol=1e-5)
    exported = run_cli(["export", f"checkpoint={run / 'checkpoints' / 'step_0000004'}", f"out={tmp_path / 'x'}"])
    assert exported.returncode == 0, exported.stderr
    assert torch.equal(load_file(tmp_path / "x" / "model.safetensors")["lm_head.weight"],
                       load_file(run / "final" / "model.safetensors")["lm_head.weight"])
    ev = run_cli(["evaluate", f"model={run}", f"data.validation_source={test_data / 'c4' / 'c4-validation.sample.jsonl.gz'}",
                  "eval.steps=2", "optim.batch_size=4", "data.input_length=64", f"out={tmp_path / 'ev.json'}"])
    assert ev.returncode == 0, ev.stderr
    held = json.loads((tmp_path / "ev.json").read_text())
    final_eval = [e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval"][-1]
    assert held["loss"] == pytest.approx(final_eval["loss"], rel=1e-5)


@pytest.mark.slow
def test_learning_works_on_c4(test_data, tmp_path):
    """A tiny T5 on the C4 sample with the real tokenizer: held-out loss falls >= 30% within minutes."""
    run = tmp_path / "run"
    res = run_cli(tiny_args(test_data, run, "optim.total_steps=300", "optim.batch_size=16",
                            "optim.warmup_steps=30", "eval.every_steps=300", "eval.steps=8",
                            "logging.every_steps=50", "precision=bf16", "checkpoint.every_steps=300",
                            "data.input_length=128", "data.shuffle_buffer=1000"))
    assert res.returncode == 0, res.stderr
    evals = [e["loss"] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval"]
    assert evals[-1] <= 0.7 * evals[0], evals
