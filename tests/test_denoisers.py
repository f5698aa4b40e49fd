"""UL2's mixture of denoisers: every denoiser's outputs give back its raw window exactly, inputs fill
input_length exactly, the measured noise rate / mean span / prefix split are the configured ones, rows are
drawn in the configured proportions (chi-square), and the mode tokens are appended to the tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanot5.config import load_config
from nanot5.data.denoisers import (
    DEFAULT_UL2_MIXTURE,
    LABEL_PAD,
    MODE_TOKENS,
    Denoiser,
    Mixture,
    add_mode_tokens,
    format_mixture,
    mode_token_ids,
    parse_mixture,
    prefix_lm,
)
from nanot5.data.span_corruption import compute_lengths, span_corrupt, span_counts
from nanot5.data.tokenizer import load_tokenizer
from nanot5.errors import ConfigError

SENTINEL, EOS = 32099, 1
MODE_IDS = {"R": 32100, "X": 32101, "S": 32102}  # the ids add_mode_tokens gives the T5 vocabulary
KIND_OF = {v: k for k, v in MODE_IDS.items()}


def undo(inputs, labels, *, kind=None, mode=True, sentinel=SENTINEL, num_sentinels=100):
    """Reassemble the raw window of one denoised row (the oracle for every denoiser, written from the
    definitions: span corruption puts each noise span after its sentinel in the targets; prefix LM's targets
    continue its inputs). Returns (kind, raw tokens, number of noise spans or None for S).

    kind: the row's kind if it has no mode token ('S' for prefix LM, 'R' for span corruption)."""
    inputs, labels = [int(t) for t in inputs], [int(t) for t in labels]
    own = [t for t in labels if t != LABEL_PAD]
    assert labels == own + [LABEL_PAD] * (len(labels) - len(own)), "padding only after the target"
    if mode:
        kind = KIND_OF[inputs[0]]
        inputs = inputs[1:]
    assert not set(MODE_IDS.values()) & set(inputs + own), "a mode token inside a row"
    assert inputs[-1] == EOS and own[-1] == EOS
    inputs, own = inputs[:-1], own[:-1]
    if kind == "S":
        return kind, inputs + own, None
    is_sentinel = lambda t: sentinel - num_sentinels < t <= sentinel  # noqa: E731
    spans, current = {}, None
    for t in own:
        if is_sentinel(t):
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    raw = []
    for t in inputs:
        raw.extend(spans.pop(t) if is_sentinel(t) else [t])
    assert not spans, "every target span is used exactly once"
    return kind, raw, len([t for t in own if is_sentinel(t)])


def mixture(spec=DEFAULT_UL2_MIXTURE, input_length=128, mode=True):
    return Mixture(spec, input_length=input_length, sentinel_id=SENTINEL, eos_id=EOS,
                   mode_ids=MODE_IDS if mode else None)


def windows(rows, length, seed=0, high=31000):
    """Random token windows; ids below 31000 so that sentinels continued past <extra_id_99> (T5) stay apart."""
    return np.random.default_rng(seed).integers(2, high, size=(rows, length)).astype(np.int32)


# ----------------------------------------------------------------------------------------------- specs


def test_default_mixture_is_the_papers_seven_denoisers():
    ds = parse_mixture(DEFAULT_UL2_MIXTURE)
    spans = [(d.kind, d.mean_noise_span_length, d.noise_density) for d in ds if d.kind != "S"]
    assert spans == [("R", 3, 0.15), ("R", 8, 0.15), ("X", 3, 0.5), ("X", 8, 0.5), ("X", 64, 0.15), ("X", 64, 0.5)]
    assert [(d.kind, d.noise_density) for d in ds if d.kind == "S"] == [("S", 0.5)]
    share = {k: sum(d.weight for d in ds if d.kind == k) for k in "RXS"}
    assert share == pytest.approx({"R": 0.4, "X": 0.4, "S": 0.2})
    assert format_mixture(ds) == DEFAULT_UL2_MIXTURE
    assert MODE_TOKENS == {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


def test_parse_mixture_forms_and_errors():
    assert parse_mixture(" r:3:0.15:2 , S:0.25:1") == (Denoiser("R", 0.15, 3.0, 2.0), Denoiser("S", 0.25, 0.0, 1.0))
    assert parse_mixture([Denoiser("X", 0.5, 32)]) == (Denoiser("X", 0.5, 32),)
    for bad, match in [("Q:3:0.15:1", "write R:MEAN_SPAN"), ("R:3:0.15", "write R:MEAN_SPAN"),
                       ("S:0.5:1:1", "write R:MEAN_SPAN"), ("R:3:abc:1", "bad number"),
                       ("R:3:1.5:1", r"rate must be in \(0, 1\)"), ("X:0:0.5:1", "mean span length"),
                       ("S:0.5:0", "weight must be > 0"), ("", "write R:MEAN_SPAN")]:
        with pytest.raises(ValueError, match=match):
            parse_mixture(bad)


def test_config_keys():
    cfg = load_config([])
    assert (cfg.data.objective, cfg.data.ul2_mixture, cfg.data.ul2_mode_tokens) == ("span", DEFAULT_UL2_MIXTURE, True)
    cfg = load_config(["data.objective=ul2", "data.ul2_mixture=R:3:0.15:1,S:0.5:1", "data.ul2_mode_tokens=false"])
    assert (cfg.data.objective, cfg.data.ul2_mixture, cfg.data.ul2_mode_tokens) == ("ul2", "R:3:0.15:1,S:0.5:1", False)
    with pytest.raises(ConfigError, match="data.objective='bert' is not valid"):
        load_config(["data.objective=bert"])
    with pytest.raises(ConfigError, match="data.ul2_mixture: bad denoiser 'R:3'"):
        load_config(["data.ul2_mixture=R:3"])


# ----------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("mode", [True, False])
@pytest.mark.parametrize("input_length", [16, 33, 64, 128, 512])
def test_every_denoiser_fills_the_inputs_exactly(input_length, mode):
    mix = mixture(input_length=input_length, mode=mode)
    assert mix.target_length == max(mix.target_lengths)
    for k, d in enumerate(mix.denoisers):
        raw, target = int(mix.raw_lengths[k]), int(mix.target_lengths[k])
        x, y = mix.apply(np.full(3, k), {k: windows(3, raw)}, np.random.default_rng(k))
        assert x.shape == (3, input_length) and y.shape == (3, mix.target_length)
        assert ((y != LABEL_PAD).sum(axis=1) == target).all()
        if d.kind == "S":
            assert raw == 2 * (input_length - mode - 1)  # rate 0.5: continuation as long as the prefix
        else:  # T5's window (random_spans_helper), or one token longer where its density-0.5 cut is undone
            t5_raw, _ = compute_lengths(input_length - mode, d.noise_density, d.mean_noise_span_length)
            assert raw == t5_raw or (d.noise_density == 0.5 and raw == t5_raw + 1)


def test_lengths_pins():
    # T5 v1.1 / nanoT5 at 512 without a mode token: T5's own numbers
    assert Denoiser("R", 0.15, 3.0).lengths(512, mode_token=False) == compute_lengths(512, 0.15, 3.0) == (568, 114)
    assert Denoiser("R", 0.15, 3.0).lengths(512, mode_token=True) == compute_lengths(511, 0.15, 3.0)
    # T5's density-0.5 cut leaves 10 input tokens of 11 here; the window one longer fills all 11
    # (14 tokens: 7 noise in 2 spans -> 14 - 7 + 2 + 1 = 10 inputs; 15 tokens: 8 in 3 -> 15 - 8 + 3 + 1 = 11)
    assert compute_lengths(11, 0.5, 3.0) == (14, 10) and span_counts(15, 0.5, 3.0) == (8, 3)
    assert Denoiser("X", 0.5, 3.0).lengths(11, mode_token=False) == (15, 12)
    # S: prefix = input_length - mode - EOS, continuation = prefix * rate / (1 - rate)
    assert Denoiser("S", 0.5).lengths(512, mode_token=True) == (1020, 511)
    assert Denoiser("S", 0.25).lengths(512, mode_token=True) == (510 + 170, 171)
    assert Denoiser("S", 0.5).lengths(512, mode_token=False) == (1022, 512)


# ----------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(("input_length", "mode"), [(512, True), (128, True), (64, False)])
def test_every_denoiser_reassembles_its_window(input_length, mode):
    """The merge property for each denoiser alone, on every row: mode token first, EOS last, targets padded
    with -100 after their own EOS, and the raw window given back exactly. At 512, X:3:0.5 has 127 spans:
    sentinels continue past <extra_id_99> (32000) into ordinary ids, as T5's do."""
    mix = mixture(input_length=input_length, mode=mode)
    for k, d in enumerate(mix.denoisers):
        raw = windows(32, int(mix.raw_lengths[k]), seed=k)
        x, y = mix.apply(np.full(32, k), {k: raw}, np.random.default_rng(100 + k))
        for w, inp, lab in zip(raw, x, y):
            kind, got, spans = undo(inp, lab, kind=None if mode else d.kind, mode=mode, num_sentinels=150)
            assert kind == d.kind and got == w.tolist()
            assert spans == mix.num_spans[k] or d.kind == "S"
            if d.kind != "S":  # sentinels count down from <extra_id_0>, one per span
                body = inp[int(mode):-1]
                assert [t for t in body if t > SENTINEL - 150] == list(range(SENTINEL, SENTINEL - spans, -1))


def test_mixed_batch_rows_keep_their_own_denoiser():
    """A batch whose rows use different denoisers: each row gets its denoiser's output, as if run alone on the
    rows of its kind in index order with the shared generator; one-denoiser span mixtures are span_corrupt."""
    mix = mixture(input_length=128)
    kinds = mix.draw(np.random.default_rng(0), 64)
    assert len(set(kinds.tolist())) == len(mix)  # all seven present
    raws = {k: windows(int((kinds == k).sum()), int(mix.raw_lengths[k]), seed=k) for k in np.unique(kinds).tolist()}
    x, y = mix.apply(kinds, raws, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    for k in sorted(raws):
        alone_x, alone_y = mix.apply(np.full(len(raws[k]), k), {k: raws[k]}, rng)
        assert np.array_equal(x[kinds == k], alone_x) and np.array_equal(y[kinds == k], alone_y)
        for w, inp, lab in zip(raws[k], x[kinds == k], y[kinds == k]):
            assert undo(inp, lab)[1] == w.tolist()
    # determinism: same generator seed, same batch
    again = mix.apply(kinds, raws, np.random.default_rng(7))
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
    # objective=span is plain span corruption (the same generator draws, no mode token, no padding)
    span = Mixture([Denoiser("R", 0.15, 3.0)], input_length=512, sentinel_id=SENTINEL, eos_id=EOS)
    w = windows(8, 568)
    got = span.apply(np.zeros(8, np.int64), {0: w}, np.random.default_rng(3))
    want = span_corrupt(w, rng=np.random.default_rng(3))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_prefix_lm_pins_and_errors():
    x, y = prefix_lm(np.array([[5, 6, 7, 8, 9]]), 2, eos_id=1)
    assert x.tolist() == [[5, 6, 1]] and y.tolist() == [[7, 8, 9, 1]]
    mix = Mixture("S:0.5:1", input_length=4, sentinel_id=-1, eos_id=1, mode_ids=MODE_IDS)
    x, y = mix.apply(np.zeros(1, np.int64), {0: np.array([[10, 11, 12, 13]])}, np.random.default_rng(0))
    assert x.tolist() == [[32102, 10, 11, 1]] and y.tolist() == [[12, 13, 1]]
    with pytest.raises(ValueError, match="0 < prefix_length"):
        prefix_lm(np.zeros((2, 4), np.int32), 4, eos_id=1)
    with pytest.raises(ValueError, match="needs windows of 4 tokens"):
        mix.apply(np.zeros(1, np.int64), {0: np.zeros((1, 5), np.int32)}, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("spec", DEFAULT_UL2_MIXTURE.split(","))
def test_noise_rate_and_mean_span_match_the_configuration(spec):
    """Measured on the outputs (noise tokens = targets without sentinels and EOS; spans = sentinels): the
    noise rate is within 2% of the configured rate and the mean noise span within 3% of the configured mean.
    T5 puts round(noise / mean) spans in every row, so a long mean span needs a long window: X:64:0.15 is
    measured at input_length 4096 (at 512 its windows hold a single 90-token span, see denoisers.py).
    For S the measured quantity is the fraction of the window in the targets."""
    (d,) = parse_mixture(spec)
    input_length = 4096 if (d.mean_noise_span_length, d.noise_density) == (64, 0.15) else 512
    mix = Mixture([d], input_length=input_length, sentinel_id=SENTINEL, eos_id=EOS, mode_ids=MODE_IDS)
    raw_length = int(mix.raw_lengths[0])
    raw = windows(16, raw_length)
    x, y = mix.apply(np.zeros(16, np.int64), {0: raw}, np.random.default_rng(1))
    noise = spans = 0
    for w, inp, lab in zip(raw, x, y):
        kind, got, n_spans = undo(inp, lab, num_sentinels=150)
        assert got == w.tolist()
        target = int((lab != LABEL_PAD).sum()) - 1  # without EOS
        noise += target - (n_spans or 0)
        spans += n_spans or 0
    rate = noise / (16 * raw_length)
    assert abs(rate / d.noise_density - 1) < 0.02, (spec, rate)
    if d.kind != "S":
        assert abs(noise / spans / d.mean_noise_span_length - 1) < 0.03, (spec, noise / spans)
        # and the spans really vary in length (not all equal to the mean), each at least one token
        lengths = np.diff(np.flatnonzero(np.r_[(y[0] > SENTINEL - 150) & (y[0] <= SENTINEL), True]))[:-1] - 1
        assert lengths.min() >= 1 and (len(lengths) < 3 or lengths.std() > 0)


def wilson_hilferty_z(chi2: float, dof: int) -> float:
    """Normal z-score of a chi-square statistic (Wilson-Hilferty cube-root approximation)."""
    return ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


@pytest.mark.parametrize("spec", [DEFAULT_UL2_MIXTURE, "R:3:0.15:5,X:32:0.5:1,S:0.25:14"])
def test_draw_proportions_chi_square(spec):
    """Rows are drawn i.i.d. with the configured shares: a chi-square test over 50,000 draws (z < 4.5, a
    p-value of ~3e-6 for a correct sampler), and every share within 5 binomial standard deviations."""
    mix = mixture(spec)
    n = 50_000
    counts = np.bincount(mix.draw(np.random.default_rng(11), n), minlength=len(mix))
    expected = n * mix.probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert wilson_hilferty_z(chi2, len(mix) - 1) < 4.5, (counts, expected)
    assert (np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - mix.probs))).all()
    # a sampler that ignored the weights would fail: the uniform shares are far outside the bound
    assert wilson_hilferty_z(float(((counts - n / len(mix)) ** 2 / (n / len(mix))).sum()), len(mix) - 1) > 10
    one = mixture("R:3:0.15:1")
    assert (one.draw(np.random.default_rng(0), 5) == 0).all()


# ----------------------------------------------------------------------------------------------- tokens


def test_add_mode_tokens(t5_tokenizer_dir, tmp_path):
    plain = load_tokenizer(t5_tokenizer_dir)
    tok = add_mode_tokens(plain, model_vocab_size=32128)
    assert len(plain) == 32100 and len(tok) == 32103  # the original is not changed
    assert mode_token_ids(tok) == MODE_IDS  # appended after the sentinels (<extra_id_0> = 32099)
    assert tok.sentinel_id(0) == 32099 and tok.sentinel_id(99) == 32000
    assert tok.encode("[NLU] Hello") == [32100] + plain.encode("Hello")  # never split
    assert tok.decode([32101, *plain.encode("Hello")]) == "Hello"  # special: dropped when decoding
    assert add_mode_tokens(tok) is tok  # idempotent
    reloaded = load_tokenizer(tok.save(tmp_path / "tok"))  # a UL2 run's final/ keeps the ids
    assert mode_token_ids(reloaded) == MODE_IDS and add_mode_tokens(reloaded) is reloaded
    with pytest.raises(ConfigError, match=r"32103 tokens, more than the model's 32100 embedding rows: set "
                                          r"model.overwrite.vocab_size>=32103"):
        add_mode_tokens(plain, model_vocab_size=32100)
    with pytest.raises(ValueError, match="has no UL2 mode tokens"):
        mode_token_ids(plain)
    with pytest.raises(ValueError, match="only some of the mode tokens"):
        add_mode_tokens(plain.with_special_tokens(["[NLU]"]))


def test_ul2_pretraining_end_to_end(test_data, tmp_path):
    """`data.objective=ul2` through the CLI: trains, evaluates on plain span corruption, and the final
    tokenizer carries the mode tokens; resuming with another objective is refused."""
    from nanot5.data.tokenizer import load_tokenizer
    from tests.test_train import run_cli, tiny_args

    run = tmp_path / "run"
    args = tiny_args(test_data, run, "optim.total_steps=2", "checkpoint.every_steps=2", "eval.every_steps=2",
                     "data.objective=ul2")
    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(run / "final")
    assert [tok.token_id(t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [32100, 32101, 32102]
    again = run_cli([a for a in args if a != "data.objective=ul2"] + ["resume=auto", "optim.total_steps=4"])
    assert again.returncode == 2 and "data.objective" in again.stderr
