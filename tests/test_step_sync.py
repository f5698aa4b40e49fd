"""The training step never reads a tensor back to the host on ordinary steps (issue 14): loss, gradient
norm and the non-finite flag stay on the device until a logging, evaluation or checkpoint step."""

from __future__ import annotations

import pytest
import torch

import nanot5.train as train_module
from nanot5.config import load_config
from tests.test_optim import NoHostSync
from tests.test_train import tiny_args


def _run(test_data, tmp_path, monkeypatch, *extra):
    steps = []
    real = train_module.train_step

    def guarded(run):
        steps.append(run.step)
        with NoHostSync():
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("error")
            try:
                real(run)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(train_module, "train_step", guarded)
    args = tiny_args(test_data, tmp_path / "run", "optim.total_steps=6", "logging.every_steps=3",
                     "eval.every_steps=6", "checkpoint.every_steps=6", "data.num_workers=0", *extra)
    summary = train_module.train(load_config(args[1:], mode="pt"))
    assert steps == list(range(6)) and summary["steps"] == 6


def test_training_steps_make_no_host_sync(test_data, tmp_path, monkeypatch):
    _run(test_data, tmp_path, monkeypatch)


def test_grad_accumulation_and_adafactor_steps_make_no_host_sync(test_data, tmp_path, monkeypatch):
    _run(test_data, tmp_path, monkeypatch, "optim.grad_acc=2", "optim.name=adafactor")


def test_the_guard_catches_a_sync(test_data, tmp_path, monkeypatch):
    """The check can fail: skip_nonfinite reads the flag every step, by design."""
    with pytest.raises(AssertionError, match="host sync"):
        _run(test_data, tmp_path, monkeypatch, "optim.skip_nonfinite=true")
