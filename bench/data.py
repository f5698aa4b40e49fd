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
# (b) end-to-end read + tokenize + pack + corrupt on one core, raw tokens/s on the C4 sample

C4_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "c4",
                         "c4-train.sample.jsonl.gz")
T5_TOKENIZER = os.path.join(os.path.dirname(C4_SAMPLE), "..", "t5-tokenizer")


def nanot5_style_pass(path: str, hf_tokenizer, raw_length: int, batch_size: int, collator) -> int:
    """Peer: the pipeline nanoT5 builds from HF pieces, written out here: json lines -> tokenizer
    __call__ on 1000 documents at a time (datasets.map's default batch; the T5 tokenizer appends EOS)
    -> group_texts (concatenate the id lists, cut raw_length chunks, drop the remainder of each map
    batch) -> per-example span-corruption collator of (a). Returns raw tokens produced."""
    import gzip
    import itertools
    import json

    def doc_batches():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts = []
            for line in f:
                texts.append(json.loads(line)["text"])
                if len(texts) == 1000:
                    yield texts
                    texts = []
            if texts:
                yield texts

    raw_tokens, rows = 0, []
    for texts in doc_batches():
        ids = hf_tokenizer(texts, return_attention_mask=False)["input_ids"]
        concatenated = list(itertools.chain.from_iterable(ids))
        usable = len(concatenated) // raw_length * raw_length
        rows.extend(concatenated[i:i + raw_length] for i in range(0, usable, raw_length))
        while len(rows) >= batch_size:
            batch, rows = np.array(rows[:batch_size]), rows[batch_size:]
            inputs, targets = collator(batch)
            torch.from_numpy(inputs), torch.from_numpy(targets)
            raw_tokens += batch.size
    return raw_tokens


def bench_pipeline(input_length: int = 512, batch_size: int = 128, repeats: int = 3) -> float:
    """Raw tokens/s of nanot5's PretrainLoader (read + tokenize + pack + shuffle + corrupt + tensors)
    on one core over the C4 sample, alternating with the nanoT5-style peer; print both; return ours."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: no Rust thread pool
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from nanot5.data.loader import PretrainLoader
    from nanot5.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(T5_TOKENIZER)
    tokenizer.hf.model_max_length = 10**9  # documents are longer than 512 tokens before packing
    raw_length, _ = compute_lengths(input_length, 0.15, 3.0)
    # one finite pass over the sample per measurement; the default 8192-window shuffle block holds it all
    loader = PretrainLoader(C4_SAMPLE, tokenizer, input_length=input_length, batch_size=batch_size,
                            infinite=False)
    collator = PerExampleT5MLM(0.15, 3.0, tokenizer.sentinel_id(0), tokenizer.eos_id, np.random.default_rng(0))

    def ours() -> int:
        return sum(batch["input_ids"].shape[0] for batch in loader) * raw_length

    def peer() -> int:
        return nanot5_style_pass(C4_SAMPLE, tokenizer.hf, raw_length, batch_size, collator)

    rates: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(repeats):  # alternate, so both see the same machine load
        for name, fn in (("ours", ours), ("peer", peer)):
            t0 = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - t0))
    ours_rate, peer_rate = float(np.median(rates["ours"])), float(np.median(rates["peer"]))
    print(f"(b) read + tokenize + pack + corrupt, C4 sample ({os.path.basename(C4_SAMPLE)}), input {input_length}, "
          f"batch {batch_size}, one core, median of {repeats} passes")
    print(f"    nanoT5-style (tokenizer __call__, group_texts, per-example collator): {peer_rate:9,.0f} raw tokens/s")
    print(f"    nanot5 PretrainLoader:                                           {ours_rate:9,.0f} raw tokens/s")
    print(f"    ratio: {ours_rate / peer_rate:.2f}x; target >= 150,000 raw tokens/s: "
          f"{'met' if ours_rate >= 150_000 else 'NOT met'}")
    return ours_rate


if __name__ == "__main__":
    bench_span_corruption()
    bench_pipeline()
