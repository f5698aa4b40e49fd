"""T5 span corruption: exact pins (as T5's preprocessors_test.py), per-row invariants on random
data, the distribution of masks, and agreement with slow per-row reference implementations."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from nanot5.data import compute_lengths, span_corrupt
from nanot5.data.span_corruption import (
    noise_span_to_unique_sentinel,
    nonnoise_span_to_unique_sentinel,
    random_segmentation,
    random_spans_noise_mask,
    span_counts,
)

SENTINEL, EOS = 32099, 1


# ----------------------------------------------------------------------------------------------
# Oracles: slow, obviously-correct versions written from the T5 paper / preprocessors.py docs.


def t5_random_spans_helper(inputs_length, noise_density, mean_span, extra_in=1, extra_tg=1):
    """T5's random_spans_helper, literally: no clipping of the span counts, EOS counted."""

    def lengths(n):
        noise = int(round(n * noise_density))
        spans = int(round(noise / mean_span))
        return n - noise + spans * extra_in + 1, noise + spans * extra_tg + 1

    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    return n, lengths(n)[1]


def reference_unique_sentinel(row, mask_row, sentinel_id):
    """One row of T5's noise_span_to_unique_sentinel, token by token."""
    out, k = [], 0
    for i, (tok, noisy) in enumerate(zip(row, mask_row)):
        if noisy and (i == 0 or not mask_row[i - 1]):
            out.append(sentinel_id - k)
            k += 1
        elif not noisy:
            out.append(int(tok))
    return out


def merge(inputs_row, targets_row, sentinel_id=SENTINEL, num_sentinels=100):
    """Undo span corruption: replace each sentinel in the inputs by what follows it in the targets."""
    is_sentinel = lambda t: sentinel_id - num_sentinels < t <= sentinel_id  # noqa: E731
    spans, current = {}, None
    for t in targets_row:
        if t == EOS:
            break
        if is_sentinel(t):
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs_row:
        if t == EOS:
            break
        out.extend(spans[int(t)] if is_sentinel(t) else [int(t)])
    return out


def runs(mask_row):
    """Lengths of the runs of True and of False in a boolean row, in order."""
    return [(bool(v), len(list(g))) for v, g in itertools.groupby(mask_row)]


# ----------------------------------------------------------------------------------------------
# compute_lengths


def test_compute_lengths_pins():
    assert compute_lengths(512, 0.15, 3.0) == (568, 114)  # nanoT5 / T5 v1.1 pre-training
    assert compute_lengths(64, 0.2, 2.0) == (70, 22)  # T5 preprocessors_test
    assert compute_lengths(64, 0.2, 1.0) == (63, 27)  # T5 preprocessors_test
    # extra tokens per span: 2 sentinels per span in inputs -> shorter raw windows
    assert compute_lengths(64, 0.2, 2.0, extra_tokens_per_span_inputs=2) == t5_random_spans_helper(
        64, 0.2, 2.0, 2, 1)


@pytest.mark.parametrize("density", [0.1, 0.15, 0.3, 0.5])
@pytest.mark.parametrize("mean_span", [1.0, 2.0, 3.0, 8.0])
def test_compute_lengths_matches_t5_helper_and_span_corrupt(density, mean_span):
    rng = np.random.default_rng(0)
    for input_length in [16, 33, 64, 100, 128, 256, 512, 1024]:
        raw, target = compute_lengths(input_length, density, mean_span)
        t5_raw, t5_target = t5_random_spans_helper(input_length, density, mean_span)
        t5_noise = int(round(t5_raw * density))
        if density == 0.5 and t5_target > input_length:
            # T5's density-0.5 hack shortens the window by one token and decrements
            # targets_length; we recompute the exact width, which is never more than T5's.
            assert raw == t5_raw - 1 and target <= t5_target - 1
        elif 1 <= t5_noise < t5_raw and int(round(t5_noise / mean_span)) >= 1:
            assert (raw, target) == (t5_raw, t5_target), input_length
        # else: T5's helper counts zero spans, which its own masks never have (they clip)

        # the lengths are exactly those of span corruption of `raw` tokens
        inputs, targets = span_corrupt(np.full((2, raw), 7), noise_density=density,
                                       mean_noise_span_length=mean_span, rng=rng)
        assert targets.shape == (2, target)
        if density == 0.5:  # the hack may leave the inputs one token short
            assert input_length - 1 <= inputs.shape[1] <= input_length
        else:
            assert inputs.shape == (2, input_length)


def test_compute_lengths_rejects_bad_values():
    with pytest.raises(ValueError, match="noise_density"):
        compute_lengths(512, 0.0, 3.0)
    with pytest.raises(ValueError, match="noise_density"):
        compute_lengths(512, 1.0, 3.0)
    with pytest.raises(ValueError, match="mean_noise_span_length"):
        compute_lengths(512, 0.15, 0.0)
    with pytest.raises(ValueError, match="input_length"):
        compute_lengths(2, 0.15, 3.0)


# ----------------------------------------------------------------------------------------------
# hand-computed outputs


def test_noise_span_to_unique_sentinel_t5_pins():
    # The cases of T5's preprocessors_test (vocab_size 1000 -> first sentinel 999), batched.
    tokens = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    mask = np.array([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 0]], dtype=bool)
    assert noise_span_to_unique_sentinel(tokens, mask, 999).tolist() == [
        [999, 12, 13, 998, 15],
        [20, 999, 22, 998, 25],
    ]
    # the targets side: here the rows keep different numbers of tokens, so one row at a time
    assert nonnoise_span_to_unique_sentinel(tokens[:1], mask[:1], 999).tolist() == [[10, 11, 999, 14, 998]]
    assert nonnoise_span_to_unique_sentinel(tokens[1:], mask[1:], 999).tolist() == [
        [999, 21, 998, 23, 24, 997]]


def test_rows_of_different_lengths_are_an_error():
    tokens = np.arange(12).reshape(2, 6)
    mask = np.array([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 0]], dtype=bool)
    with pytest.raises(ValueError, match="different lengths"):
        nonnoise_span_to_unique_sentinel(tokens, mask, 999)
    with pytest.raises(ValueError, match="must both be"):
        noise_span_to_unique_sentinel(tokens, mask[:, :5], 999)
    # an integer 0/1 mask means the same as a boolean one
    assert np.array_equal(noise_span_to_unique_sentinel(tokens, mask.astype(np.int64), 999),
                          noise_span_to_unique_sentinel(tokens, mask, 999))


def test_span_corrupt_forced_masks():
    # 4 tokens at density 0.25: one noise token in one span, which must end the row.
    tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    inputs, targets = span_corrupt(tokens, noise_density=0.25, rng=np.random.default_rng(0))
    assert inputs.tolist() == [[5, 6, 7, SENTINEL, EOS], [9, 10, 11, SENTINEL, EOS]]
    assert targets.tolist() == [[SENTINEL, 8, EOS], [SENTINEL, 12, EOS]]
    # 6 tokens, density 0.5, spans of 1: 3 noise spans and 3 non-noise spans of one token each.
    tokens = np.array([[5, 6, 7, 8, 9, 10]])
    inputs, targets = span_corrupt(tokens, noise_density=0.5, mean_noise_span_length=1.0,
                                   sentinel_id=99, eos_id=3, rng=np.random.default_rng(1))
    assert inputs.tolist() == [[5, 99, 7, 98, 9, 97, 3]]
    assert targets.tolist() == [[99, 6, 98, 8, 97, 10, 3]]


# ----------------------------------------------------------------------------------------------
# random data: every row


@pytest.mark.parametrize(
    "input_length,density,mean_span", [(512, 0.15, 3.0), (128, 0.3, 2.0), (64, 0.15, 8.0), (33, 0.5, 1.0)])
def test_span_corrupt_every_row(input_length, density, mean_span):
    raw_length, target_length = compute_lengths(input_length, density, mean_span)
    num_noise, num_spans = span_counts(raw_length, density, mean_span)
    rng = np.random.default_rng(123)
    tokens = rng.integers(2, SENTINEL - 100, size=(64, raw_length))
    inputs, targets = span_corrupt(tokens, noise_density=density, mean_noise_span_length=mean_span, rng=rng)
    assert inputs.shape == (64, input_length) and targets.shape == (64, target_length)
    assert inputs.dtype == tokens.dtype and targets.dtype == tokens.dtype
    expected_sentinels = list(range(SENTINEL, SENTINEL - num_spans, -1))
    for raw, inp, tgt in zip(tokens, inputs, targets):
        assert inp[-1] == EOS and tgt[-1] == EOS
        # sentinels in order, one per span, the inputs ending with the last one (rows end in noise)
        assert [t for t in inp if t > SENTINEL - 100] == expected_sentinels
        assert [t for t in tgt if t > SENTINEL - 100] == expected_sentinels
        assert tgt[0] == SENTINEL and inp[-2] == SENTINEL - num_spans + 1
        # targets hold exactly the noise tokens, inputs the rest
        assert len(tgt) - num_spans - 1 == num_noise
        assert len(inp) - num_spans - 1 == raw_length - num_noise
        # no empty spans on either side: two sentinels are never adjacent
        assert not np.any((tgt[1:] > SENTINEL - 100) & (tgt[:-1] > SENTINEL - 100))
        assert not np.any((inp[1:] > SENTINEL - 100) & (inp[:-1] > SENTINEL - 100))
        assert merge(inp, tgt) == raw.tolist()


def test_span_corrupt_matches_reference_on_the_same_mask():
    # Same seed -> span_corrupt draws the same mask that random_spans_noise_mask returns.
    tokens = np.random.default_rng(5).integers(2, 30000, size=(16, 568))
    mask = random_spans_noise_mask(568, 0.15, 3.0, batch=16, rng=np.random.default_rng(9))
    inputs, targets = span_corrupt(tokens, rng=np.random.default_rng(9))
    for raw, m, inp, tgt in zip(tokens, mask, inputs, targets):
        assert inp.tolist() == reference_unique_sentinel(raw, m, SENTINEL) + [EOS]
        assert tgt.tolist() == reference_unique_sentinel(raw, ~m, SENTINEL) + [EOS]


def test_noise_mask_structure():
    length, density, mean_span = 568, 0.15, 3.0
    num_noise, num_spans = span_counts(length, density, mean_span)
    assert (num_noise, num_spans) == (85, 28)
    mask = random_spans_noise_mask(length, density, mean_span, batch=200, rng=np.random.default_rng(0))
    assert mask.shape == (200, length) and mask.dtype == bool
    for row in mask:
        r = runs(row)
        kinds = [noisy for noisy, _ in r]
        assert kinds == [False, True] * num_spans  # alternate, non-noise first, noise last
        assert sum(n for noisy, n in r if noisy) == num_noise


def test_mean_span_length_over_many_draws():
    # Every row has round(noise / mean_span) spans, so the mean is off only by that rounding
    # (2.4% for 256-token inputs, say); the issue asks for 2% at these lengths.
    for input_length, mean_span in [(512, 3.0), (1024, 3.0), (512, 2.0), (128, 3.0), (2048, 3.0)]:
        raw_length, _ = compute_lengths(input_length, 0.15, mean_span)
        mask = random_spans_noise_mask(raw_length, 0.15, mean_span, batch=300, rng=np.random.default_rng(1))
        noise_spans = [n for row in mask for noisy, n in runs(row) if noisy]
        assert abs(np.mean(noise_spans) / mean_span - 1) < 0.02, (input_length, mean_span)


def test_span_length_distribution_is_that_of_uniform_compositions():
    # In a uniformly random composition of n into s parts, a given part has length j with
    # probability C(n - j - 1, s - 2) / C(n - 1, s - 1).
    n_noise, n_spans, batch = 85, 28, 4000
    lengths = random_segmentation(n_noise, n_spans, batch, np.random.default_rng(2))
    assert (lengths.sum(axis=1) == n_noise).all() and (lengths >= 1).all()
    counts = np.bincount(lengths.ravel(), minlength=12)
    total = lengths.size
    for j in range(1, 8):
        p = math.comb(n_noise - j - 1, n_spans - 2) / math.comb(n_noise - 1, n_spans - 1)
        sigma = math.sqrt(total * p * (1 - p))
        assert abs(counts[j] - total * p) < 5 * sigma, (j, counts[j], total * p)


def wilson_hilferty_z(chi2: float, dof: int) -> float:
    """Normal z-score of a chi-square statistic (Wilson-Hilferty cube-root approximation)."""
    return ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


@pytest.mark.parametrize("length,density,mean_span", [(10, 0.3, 1.5), (12, 0.25, 1.0), (9, 0.4, 2.0)])
def test_all_masks_equally_likely(length, density, mean_span):
    num_noise, num_spans = span_counts(length, density, mean_span)
    # Enumerate every valid mask: the right number of noise tokens in the right number of
    # runs, alternating, starting with non-noise.
    valid = {
        bits
        for bits in itertools.product([False, True], repeat=length)
        if sum(bits) == num_noise and [k for k, _ in runs(bits)] == [False, True] * num_spans
    }
    draws = 3000 * len(valid)
    masks = random_spans_noise_mask(length, density, mean_span, batch=draws, rng=np.random.default_rng(3))
    freq = Counter(map(tuple, masks.tolist()))
    assert set(freq) == valid  # every mask valid, every valid mask seen
    expected = draws / len(valid)
    chi2 = sum((c - expected) ** 2 / expected for c in freq.values())
    assert wilson_hilferty_z(chi2, len(valid) - 1) < 4.5, chi2
    assert max(abs(c - expected) for c in freq.values()) < 5 * math.sqrt(expected)


def test_random_segmentation_redraws_tied_keys():
    class TiedFirst(np.random.Generator):
        """A real generator whose first draw is all ties (every row must be redrawn)."""

        calls = 0

        def random(self, size=None, dtype=np.float64, out=None):
            TiedFirst.calls += 1
            x = super().random(size, dtype=dtype)
            return np.full_like(x, 0.5) if TiedFirst.calls == 1 else x

    rng = TiedFirst(np.random.PCG64(0))
    lengths = random_segmentation(40, 7, 50, rng)
    assert TiedFirst.calls == 2
    assert lengths.shape == (50, 7) and (lengths >= 1).all() and (lengths.sum(axis=1) == 40).all()
    assert len({tuple(r) for r in lengths.tolist()}) > 40  # really random after the redraw


def test_random_segmentation_edge_cases():
    rng = np.random.default_rng(0)
    assert random_segmentation(5, 1, 3, rng).tolist() == [[5]] * 3
    assert random_segmentation(4, 4, 2, rng).tolist() == [[1, 1, 1, 1]] * 2
    with pytest.raises(ValueError, match="non-empty segments"):
        random_segmentation(3, 4, 1, rng)


# ----------------------------------------------------------------------------------------------
# API: determinism, types, errors


def test_determinism():
    tokens = np.random.default_rng(0).integers(2, 30000, size=(8, 568))
    a = span_corrupt(tokens, rng=np.random.default_rng(42))
    b = span_corrupt(tokens, rng=np.random.default_rng(42))
    c = span_corrupt(tokens, rng=np.random.default_rng(43))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # a generator's successive batches differ
    rng = np.random.default_rng(42)
    assert not np.array_equal(span_corrupt(tokens, rng=rng)[0], span_corrupt(tokens, rng=rng)[0])


def test_torch_in_torch_out_and_dtypes():
    tokens = torch.randint(2, 30000, (4, 568), dtype=torch.long)
    inputs, targets = span_corrupt(tokens, rng=np.random.default_rng(0))
    assert isinstance(inputs, torch.Tensor) and inputs.dtype == torch.long and inputs.shape == (4, 512)
    assert isinstance(targets, torch.Tensor) and targets.shape == (4, 114)
    ref_inputs, ref_targets = span_corrupt(tokens.numpy(), rng=np.random.default_rng(0))
    assert np.array_equal(inputs.numpy(), ref_inputs) and np.array_equal(targets.numpy(), ref_targets)
    # int32 stays int32; a single 1-D row gives 1-D outputs
    inputs32, _ = span_corrupt(tokens.numpy().astype(np.int32), rng=np.random.default_rng(0))
    assert inputs32.dtype == np.int32 and np.array_equal(inputs32, ref_inputs)
    one_in, one_tg = span_corrupt(tokens.numpy()[0], rng=np.random.default_rng(0))
    assert one_in.shape == (512,) and one_tg.shape == (114,)


def test_bad_arguments():
    tokens = np.zeros((2, 568), dtype=np.int64)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        span_corrupt(tokens, rng=np.random.RandomState(0))
    with pytest.raises(ValueError, match="integer array"):
        span_corrupt(tokens.astype(np.float32), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="integer array"):
        span_corrupt(tokens[None], rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corrupt(tokens[:, :1], rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_density"):
        span_corrupt(tokens, noise_density=1.5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="sentinel ids"):
        span_corrupt(tokens, sentinel_id=10, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="do not fit"):
        span_corrupt(tokens.astype(np.int8), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="empty batch"):
        span_corrupt(tokens[:0], rng=np.random.default_rng(0))
