"""T5 span corruption, vectorised over a batch.

Each function is named after the T5 preprocessing step it reproduces exactly
(google-research/text-to-text-transfer-transformer, t5/data/preprocessors.py:
`random_spans_helper`, `random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`; Raffel et al. 2020, section 3.1.4). T5 and the
HF collator nanoT5 copies (run_t5_mlm_flax.py) draw a mask one example at a time;
here every step works on a whole (B, L) batch at once, with no Python loop over rows.

    raw:     a  b  c  d  e  f  g  h          noise mask: 0 0 1 1 0 0 0 1
    inputs:  a  b  <X0>  e  f  g  <X1>  </s>
    targets: <X0>  c  d  <X1>  h  </s>

where <Xk> = sentinel_id - k (<extra_id_k> in the T5 vocabulary: 32099 - k).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "compute_lengths",
    "span_counts",
    "random_segmentation",
    "random_spans_noise_mask",
    "noise_span_to_unique_sentinel",
    "nonnoise_span_to_unique_sentinel",
    "span_corrupt",
]


def _check_density(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_noise_span_length > 0:
        raise ValueError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) of every mask over `length` tokens.

    As in T5's `random_spans_noise_mask`: round(length * density) noise tokens, clipped to
    [1, length - 1] so both kinds of span exist, and round(noise / mean_span) spans, at least 1.
    Python's round() rounds half to even, like tf.round and np.round in T5 and HF.
    """
    _check_density(noise_density, mean_noise_span_length)
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens per row, got {length}")
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def compute_lengths(
    input_length: int,
    noise_density: float,
    mean_noise_span_length: float,
    *,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
    """(raw_length, target_length) such that corrupting raw_length tokens gives exactly
    `input_length` input tokens and `target_length` target tokens, EOS included in both.

    T5's `random_spans_helper`: the longest raw window whose inputs (non-noise tokens, plus
    `extra_tokens_per_span_inputs` sentinels per noise span, plus EOS) fit in `input_length`,
    so nothing is padded or truncated. compute_lengths(512, 0.15, 3.0) == (568, 114) (nanoT5),
    compute_lengths(64, 0.2, 2.0) == (70, 22) (T5's preprocessors_test).
    One deliberate difference: the span counts are clipped the way the mask clips them
    (`span_counts`), so the lengths stay exact in the degenerate tiny cases where T5's helper
    (which does not clip) disagrees with its own masks.
    """
    if input_length < 3:
        raise ValueError(f"input_length must be >= 3 (a token, a sentinel and EOS), got {input_length}")

    def lengths(raw_length: int) -> tuple[int, int]:
        num_noise, num_spans = span_counts(raw_length, noise_density, mean_noise_span_length)
        inputs = raw_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1
        targets = num_noise + num_spans * extra_tokens_per_span_targets + 1
        return inputs, targets

    raw_length = max(input_length - 1, 2)
    while lengths(raw_length + 1)[0] <= input_length:
        raw_length += 1
    target_length = lengths(raw_length)[1]
    # T5's hack: at density 0.5 shorten the window by one so that targets are not longer than
    # inputs (inputs_length is usually the round number). T5 then decrements target_length; we
    # recompute it so that it stays the exact target width of the shorter window.
    if noise_density == 0.5 and target_length > lengths(raw_length)[0]:
        raw_length -= 1
        target_length = lengths(raw_length)[1]
    return raw_length, target_length


def random_segmentation(
    num_items: int, num_segments: int, batch: int, rng: np.random.Generator
) -> np.ndarray:
    """Lengths of `num_segments` non-empty segments that split `num_items` items, per row.

    Batched T5 `_random_segmentation`: every composition of num_items into num_segments
    positive parts is equally likely. A composition is a choice of num_segments - 1 cut points
    among the num_items - 1 gaps between items; we cut at the gaps holding the smallest of
    i.i.d. random keys (a uniformly random subset, by symmetry), found with a linear-time
    partition instead of T5's full shuffle. Returns (batch, num_segments) int64.
    """
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"cannot split {num_items} items into {num_segments} non-empty segments")
    k = num_segments - 1  # cuts to choose among num_items - 1 gaps
    if k == 0 or k == num_items - 1:  # no choice to make: one segment, or all singletons
        return np.full((batch, num_segments), num_items // num_segments, dtype=np.int64)
    keys = rng.random((batch, num_items - 1), dtype=np.float32)  # (B, G)
    # Positive float32s order like their int32 bit patterns, and integer partition is faster.
    ikeys = keys.view(np.int32)
    kth = np.partition(ikeys, k, axis=1)[:, k : k + 1]  # (B, 1) the (k+1)-th smallest key
    cut = ikeys < kth  # (B, G) exactly k cuts per row, unless keys tie at the threshold
    # No row has more than k cuts, so a full total means every row has exactly k.
    while np.count_nonzero(cut) != batch * k:
        # Redraw the tied rows (rare: ~G / 2^24 per row). Ties are symmetric in the gap positions,
        # so rejecting them keeps every subset equally likely.
        rows = np.flatnonzero(np.count_nonzero(cut, axis=1) != k)
        ikeys = rng.random((len(rows), num_items - 1), dtype=np.float32).view(np.int32)
        cut[rows] = ikeys < np.partition(ikeys, k, axis=1)[:, k : k + 1]
    # Row-major flat indices list each row's cuts in order; a cut at gap g starts a segment at
    # item g + 1.
    gaps = num_items - 1
    starts = np.flatnonzero(cut).reshape(batch, k) - gaps * np.arange(batch)[:, None] + 1  # (B, k)
    bounds = np.empty((batch, num_segments + 1), dtype=np.int64)
    bounds[:, 0] = 0
    bounds[:, 1:-1] = starts
    bounds[:, -1] = num_items
    return np.diff(bounds, axis=1)  # (B, num_segments)


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    *,
    batch: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean noise masks (batch, length), T5's `random_spans_noise_mask` for each row.

    Each row has span_counts(...) noise tokens in that many spans; spans alternate between
    non-noise and noise, starting with non-noise (so the row ends with noise); subject to
    that, all masks are equally likely.
    """
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = random_segmentation(num_noise, num_spans, batch, rng)  # (B, S)
    nonnoise_lengths = random_segmentation(length - num_noise, num_spans, batch, rng)  # (B, S)
    span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=2).reshape(-1)  # (B*2S,)
    # Every row's spans tile exactly `length` tokens, so one flat repeat paints the whole batch.
    is_noise_span = np.tile(np.array([False, True]), batch * num_spans)  # (B*2S,)
    return np.repeat(is_noise_span, span_lengths).reshape(batch, length)


def noise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_id: int
) -> np.ndarray:
    """Replace each run of noise tokens by one sentinel: the k-th run of a row (from 0) becomes
    `sentinel_id - k` (T5's `noise_span_to_unique_sentinel` with sentinel_id = vocab_size - 1).

    tokens, noise_mask: (B, L). Returns (B, L') where L' = L - noise tokens + noise spans, which
    must be the same for every row (it is for `random_spans_noise_mask`).
    """
    tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, dtype=bool)
    if tokens.shape != noise_mask.shape or tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens {tokens.shape} and noise_mask {noise_mask.shape} must both be (B, L), B>0")
    batch = tokens.shape[0]
    prev_noise = np.zeros_like(noise_mask)
    prev_noise[:, 1:] = noise_mask[:, :-1]
    first_noise = noise_mask & ~prev_noise  # (B, L) the token each sentinel replaces
    keep = ~(noise_mask & prev_noise)  # (B, L) drop the rest of each noise span
    kept = keep.view(np.uint8).sum(axis=1, dtype=np.int64)  # (B,)
    if (kept != kept[0]).any():
        lengths = sorted(set(kept.tolist()))
        raise ValueError(f"rows would get different lengths after span corruption: {lengths}")
    width = int(kept[0])
    out = tokens[keep]  # (B * width,) row-major compaction
    sentinel_at = np.flatnonzero(first_noise[keep])  # where the first noise tokens landed, in order
    # k = rank of each span within its row: subtract the number of spans in earlier rows.
    row = sentinel_at // width
    spans_per_row = np.bincount(row, minlength=batch)
    span_index = np.arange(len(row)) - (np.cumsum(spans_per_row) - spans_per_row)[row]
    out[sentinel_at] = sentinel_id - span_index
    return out.reshape(batch, width)


def nonnoise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_id: int
) -> np.ndarray:
    """The targets side: each non-noise run becomes a sentinel, so what remains is
    `<X0> noise span 0 <X1> noise span 1 ...` (T5's `nonnoise_span_to_unique_sentinel`)."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinel_id)


def _append_eos(x: np.ndarray, eos_id: int) -> np.ndarray:
    out = np.empty((x.shape[0], x.shape[1] + 1), dtype=x.dtype)
    out[:, :-1] = x
    out[:, -1] = eos_id
    return out


def span_corrupt(
    tokens: Any,
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    sentinel_id: int = 32099,
    eos_id: int = 1,
    rng: np.random.Generator,
) -> tuple[Any, Any]:
    """T5 span corruption of a batch of raw windows.

    tokens: int array (B, raw_length) (numpy or a torch tensor; 1-D means one row).
    Returns (inputs, targets), (B, input_length) and (B, target_length) of the same kind and
    dtype, with the lengths `compute_lengths` gives (512 and 114 for raw_length 568): noise
    spans replaced by sentinels sentinel_id, sentinel_id - 1, ... in the inputs, the targets
    holding each sentinel followed by the span it replaced, EOS appended to both.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    is_torch = type(tokens).__module__.startswith("torch")
    array = tokens.cpu().numpy() if is_torch else np.asarray(tokens)
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be an integer array (batch, raw_length), got {array.dtype} "
                         f"{tuple(array.shape)}")
    rows = array.reshape(-1, array.shape[-1])  # (B, L)
    batch, length = rows.shape
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    if sentinel_id - (num_spans - 1) < 0:
        raise ValueError(f"{num_spans} noise spans per row need sentinel ids down to "
                         f"{sentinel_id - num_spans + 1}, below 0")
    if max(sentinel_id, eos_id) > np.iinfo(rows.dtype).max:
        raise ValueError(f"sentinel_id {sentinel_id} / eos_id {eos_id} do not fit tokens of dtype "
                         f"{rows.dtype}")
    if batch == 0:
        raise ValueError("span_corrupt got an empty batch (0 rows)")

    mask = random_spans_noise_mask(length, noise_density, mean_noise_span_length, batch=batch, rng=rng)
    inputs = _append_eos(noise_span_to_unique_sentinel(rows, mask, sentinel_id), eos_id)
    targets = _append_eos(nonnoise_span_to_unique_sentinel(rows, mask, sentinel_id), eos_id)
    if array.ndim == 1:
        inputs, targets = inputs[0], targets[0]
    if is_torch:
        import torch

        return torch.from_numpy(inputs).to(tokens.device), torch.from_numpy(targets).to(tokens.device)
    return inputs, targets
