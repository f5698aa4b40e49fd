"""Data pipeline benchmarks: `python bench/data.py`.

(a) span corruption of a 128 x 568 batch on one core: nanot5's batched `span_corrupt` vs a
    per-example numpy baseline following the algorithm of HF's DataCollatorForT5MLM
    (examples/flax/language-modeling/run_t5_mlm_flax.py), which nanoT5 uses.
(b) end-to-end read + tokenize + pack + corrupt throughput: `bench_pipeline` (to be added).

Both are timed alternately in the same process (the machine is shared and noisy); we print
medians and the ratio. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from nanot5.data import compute_lengths, span_corrupt  # noqa: E402
from nanot5.data.span_corruption import (  # noqa: E402
    noise_span_to_unique_sentinel,
    nonnoise_span_to_unique_sentinel,
    random_spans_noise_mask,
)

# ----------------------------------------------------------------------------------------------
# (a) span corruption


class PerExampleT5MLM:
    """Baseline: the HF run_t5_mlm_flax.py collator's algorithm, written out here.

    One noise mask per example (shuffle a cut indicator, cumsum, count segment lengths,
    interleave, paint with a cumsum of span starts), then batch-wide sentinel ids from a cumsum
    of span starts and a filter of the -1 placeholders into a fixed width, then EOS.
    """

    def __init__(self, noise_density: float, mean_noise_span_length: float, sentinel_id: int, eos_id: int,
                 rng: np.random.Generator):
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.sentinel_id = sentinel_id
        self.eos_id = eos_id
        self.rng = rng

    def segment_lengths(self, num_items: int, num_segments: int) -> np.ndarray:
        # Shuffle (num_segments - 1) ones among num_items - 1 gaps; each one starts a new segment.
        is_cut = np.arange(num_items - 1) < num_segments - 1
        is_cut = self.rng.permutation(is_cut)
        segment_id = np.cumsum(np.concatenate([[0], is_cut]))
        return np.unique(segment_id, return_counts=True)[1]

    def noise_mask(self, length: int) -> np.ndarray:
        num_noise = int(np.round(length * self.noise_density))
        num_noise = min(max(num_noise, 1), length - 1)
        num_spans = max(int(np.round(num_noise / self.mean_noise_span_length)), 1)
        noise_lengths = self.segment_lengths(num_noise, num_spans)
        nonnoise_lengths = self.segment_lengths(length - num_noise, num_spans)
        spans = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
        span_start = np.zeros(length, dtype=np.int8)
        span_start[np.cumsum(spans)[:-1]] = 1
        return np.cumsum(span_start) % 2 == 1

    def sentinel_ids(self, mask: np.ndarray) -> np.ndarray:
        # +sentinel at the first token of each run of `mask`, -1 on the rest of the run, 0 elsewhere.
        mask = mask.astype(np.int8)
        first = mask - np.roll(mask, 1, axis=-1) == 1
        first[:, 0] = mask[:, 0] == 1
        run = np.cumsum(first, axis=-1)
        ids = np.where(first, self.sentinel_id + 1 - run, 0)
        return ids - (mask - first)

    def filter(self, tokens: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
        full = np.where(sentinels != 0, sentinels, tokens)
        kept = full[full >= 0].reshape(tokens.shape[0], -1)
        return np.concatenate([kept, np.full((tokens.shape[0], 1), self.eos_id, dtype=tokens.dtype)], axis=-1)

    def __call__(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch, length = tokens.shape
        mask = np.stack([self.noise_mask(length) for _ in range(batch)])  # the per-example part
        inputs = self.filter(tokens, self.sentinel_ids(mask))
        targets = self.filter(tokens, self.sentinel_ids(~mask))
        return inputs, targets


def _median_ms(times: list[float]) -> float:
    return 1e3 * float(np.median(times))


def bench_span_corruption(batch: int = 128, input_length: int = 512, noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0, repeats: int = 200, seed: int = 0) -> float:
    """Time ours vs the per-example baseline on one core; print ms/batch and the ratio; return it."""
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # one core, literally (numpy itself is single-threaded here)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    raw_length, target_length = compute_lengths(input_length, noise_density, mean_noise_span_length)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 32000, size=(batch, raw_length), dtype=np.int64)
    baseline = PerExampleT5MLM(noise_density, mean_noise_span_length, 32099, 1, np.random.default_rng(seed))

    def ours() -> tuple[np.ndarray, np.ndarray]:
        return span_corrupt(tokens, noise_density=noise_density,
                            mean_noise_span_length=mean_noise_span_length, rng=rng)

    # Sanity before timing: same shapes, and on one shared mask both give the same outputs.
    for fn in (ours, lambda: baseline(tokens)):
        inputs, targets = fn()
        assert inputs.shape == (batch, input_length) and targets.shape == (batch, target_length)
    mask = random_spans_noise_mask(raw_length, noise_density, mean_noise_span_length, batch=batch, rng=rng)
    assert (baseline.filter(tokens, baseline.sentinel_ids(mask))[:, :-1]
            == noise_span_to_unique_sentinel(tokens, mask, 32099)).all()
    assert (baseline.filter(tokens, baseline.sentinel_ids(~mask))[:, :-1]
            == nonnoise_span_to_unique_sentinel(tokens, mask, 32099)).all()

    t_ours, t_base = [], []
    for _ in range(5):  # warm-up
        ours(), baseline(tokens)
    for _ in range(repeats):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        baseline(tokens)
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_base.append(t2 - t1)
    ms_ours, ms_base = _median_ms(t_ours), _median_ms(t_base)
    ratio = ms_base / ms_ours
    print(f"(a) span corruption {batch}x{raw_length} -> inputs {input_length}, targets {target_length}, "
          f"one core, median of {repeats}")
    print(f"    per-example (HF run_t5_mlm_flax algorithm): {ms_base:7.3f} ms/batch")
    print(f"    nanot5 span_corrupt (batched):              {ms_ours:7.3f} ms/batch")
    print(f"    speed-up: {ratio:.1f}x (target >= 3x)")
    return ratio


# ----------------------------------------------------------------------------------------------
# (b) end-to-end read + tokenize + pack + corrupt on one core, raw tokens/s on the C4 sample:
# def bench_pipeline(...) -> float  goes here.


if __name__ == "__main__":
    bench_span_corruption()
    # bench_pipeline()  # (b)
