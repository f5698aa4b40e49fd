"""Helpers shared by the benchmarks: the HF twin of a nanot5 model, alternating order, timed steps.

Import as `from bench.common import ...` (each bench puts the repository root on sys.path).
"""

from __future__ import annotations

import torch

from nanot5.hf import config_to_hf, from_hf_state_dict
from nanot5.model import T5, T5Config


def build_hf(cfg: T5Config, seed: int = 0):
    """A random-init `transformers.T5ForConditionalGeneration` with our config, in training mode.

    transformers >= 5 shares lm_head with the embedding at construction even for v1.1 configs;
    the head gets its own weight, drawn like ours (std d_model**-0.5, so that logits stay O(1)).
    """
    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    hf = T5ForConditionalGeneration(HFConfig(**config_to_hf(cfg))).train()
    if not cfg.tie_word_embeddings:
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * cfg.d_model ** -0.5)
    return hf


def twin(hf, cfg: T5Config, device: torch.device | str = "cpu") -> T5:
    """Our T5 (config `cfg`, e.g. with another attention implementation) holding `hf`'s weights,
    built directly on `device`, in `hf`'s training/eval mode."""
    with torch.device(device):
        ours = T5(cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return ours.train(hf.training)


def rotated(names: list[str], r: int) -> list[str]:
    """The order of alternating round r: `names` rotated by r, so every contender goes first in turn."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing on an accelerator); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, device: torch.device, clock) -> list[float]:
    """One untimed call of `step` (allocations, state), then `steps` timed calls; their durations."""
    step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = clock()
        step()
        sync(device)
        times.append(clock() - t0)
    return times
