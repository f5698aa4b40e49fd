"""The memory plan against measured memory: the tensors a real forward saves for backward, and the
peak of real fp32 training steps on the CPU, for tiny and small T5 models."""

from __future__ import annotations

import contextlib
import gc
import json

import pytest
import torch

from nanot5.config import ConfigError, load_config
from nanot5.model import T5
from nanot5.optim import build_optimizer, param_groups
from nanot5.plan import memory_plan, plan_main, step_lengths
from nanot5.train import accumulate_gradients, model_config


def config(*overrides: str):
    return load_config(["preset=nanot5-base", "precision=fp32", "model.compile=false", *overrides])


def model_and_batches(cfg):
    torch.manual_seed(0)
    model = T5(model_config(cfg))
    B = cfg.optim.batch_size // cfg.optim.grad_acc
    S, T = step_lengths(cfg)
    V = model.config.vocab_size
    batches = [{"input_ids": torch.randint(2, V, (B, S)), "labels": torch.randint(2, V, (B, T))}
               for _ in range(cfg.optim.grad_acc)]
    return model, batches


def measured_peak(cfg, tmp_path) -> int:
    """Peak bytes of two real training steps (every micro-batch's forward and backward, clipping,
    optimizer step, zero_grad) in one CPU process, as torch's CPU allocator counts them.

    Method: torch.profiler(profile_memory=True) records every CPU tensor allocation and free with
    the running total of the bytes allocated while it profiles ("Total Allocated"); the maximum
    minus the total at the start is what the steps add on top of the parameters, which exist
    before and whose bytes are exact. Counted: every tensor torch allocates (activations,
    gradients, optimizer state, temporaries). Not counted: the Python heap, oneDNN's own scratch
    memory, the batch (built before). RSS would add the allocator's slack and the libraries.
    """
    model, batches = model_and_batches(cfg)
    opt = build_optimizer(cfg.optim.name, param_groups(model, cfg.optim.weight_decay), lr=1e-3)
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):  # the first step allocates the optimizer state, the second runs with it
            accumulate_gradients(model, batches, contextlib.nullcontext())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]  # earlier sessions' leftovers, if any
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + max(m["Total Allocated"] for m in memory) - start


PEAK_CASES = {
    # the training tests' tiny run: the vocabulary (logits, embeddings) dominates
    "tiny": ("model.name=t5-v1_1-tiny", "data.input_length=64", "optim.batch_size=4"),
    # long inputs, small vocabulary: the attention probabilities dominate, with and without checkpointing
    "tiny-attention": ("model.name=t5-v1_1-tiny", "model.overwrite.vocab_size=1024", "data.input_length=512",
                       "optim.batch_size=16"),
    "tiny-attention-checkpointing": ("model.name=t5-v1_1-tiny", "model.overwrite.vocab_size=1024",
                                     "data.input_length=512", "optim.batch_size=16",
                                     "model.gradient_checkpointing=true"),
    # Adafactor's factored state; gradients that exist during the second micro-batch's backward
    "tiny-adafactor-grad-acc": ("model.name=t5-v1_1-tiny", "data.input_length=128", "optim.batch_size=8",
                                "optim.grad_acc=2", "optim.name=adafactor"),
    # T5 v1.1-small (77M): weights, gradients and AdamWScale's moments dominate
    "small": ("model.name=t5-v1_1-small", "data.input_length=64", "optim.batch_size=2"),
}


@pytest.mark.parametrize("case", list(PEAK_CASES))
def test_plan_peak_within_20_percent_of_measured(case, tmp_path):
    cfg = config(*PEAK_CASES[case])
    plan = memory_plan(cfg, device="cpu")
    measured = measured_peak(cfg, tmp_path)
    assert abs(plan.peak / measured - 1) <= 0.2, (plan.peak, measured, plan.breakdown["at"])


def test_activations_are_the_tensors_the_forward_saves():
    # every tensor autograd saves for backward, counted once per storage, parameters excluded
    cfg = config("model.name=t5-v1_1-tiny", "model.overwrite.vocab_size=1024", "data.input_length=128",
                 "optim.batch_size=4")
    model, (batch,) = model_and_batches(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    plan = memory_plan(cfg, device="cpu")
    assert plan.activations == pytest.approx(sum(saved.values()), rel=0.02)
    model.config.gradient_checkpointing = True
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    # checkpointed blocks keep only their inputs (torch.utils.checkpoint saves them for the recompute)
    assert plan.activations_checkpointed == pytest.approx(sum(saved.values()), rel=0.02)
    assert plan.activations_checkpointed < plan.activations / 4


def test_fsdp_shards_what_ddp_replicates():
    cfg = config("model.name=t5-v1_1-base", "precision=bf16", "optim.batch_size=64")
    single = memory_plan(cfg, world_size=1)
    ddp = memory_plan(cfg, world_size=8, strategy="ddp")
    fsdp = memory_plan(cfg, world_size=8, strategy="fsdp")
    assert single.micro_batch == 64 and ddp.micro_batch == fsdp.micro_batch == 8
    assert ddp.parameters == single.parameters and ddp.gradients == 2 * single.gradients  # + DDP's buckets
    assert fsdp.parameters == pytest.approx(single.parameters / 8, rel=0.01)
    assert fsdp.optimizer_state == pytest.approx(single.optimizer_state / 8, rel=0.01)
    assert fsdp.peak < ddp.peak < single.peak
    ada = memory_plan(config("model.name=t5-v1_1-base", "optim.name=adafactor"), world_size=1)
    assert ada.optimizer_state < single.optimizer_state / 100  # factored: rows + columns per matrix
    with pytest.raises(ConfigError, match="world_size=3"):
        memory_plan(cfg, world_size=3)


def test_plan_cli_and_the_big_presets(capsys):
    # the presets for 8 x 80 GB: FSDP, and a peak that leaves room for what the plan leaves out
    for preset, model in (("t5-large", "t5-v1_1-large"), ("t5-xl", "t5-v1_1-xl")):
        assert plan_main([f"preset={preset}", "world_size=8", "memory_gb=80"]) == 0
        out = capsys.readouterr().out
        assert model in out and "fsdp on 8 devices" in out and "fits in 80 GB" in out
        plan = memory_plan(load_config([f"preset={preset}"]), world_size=8)
        assert plan.strategy == "fsdp" and plan.micro_batch == 16 and plan.peak < 0.6 * plan.memory
    assert plan_main(["preset=t5-xl", "memory_gb=80"]) == 1  # one GPU cannot hold XL's step
    assert "does NOT fit in 80 GB" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="world_size"):
        plan_main(["world_size=two"])
