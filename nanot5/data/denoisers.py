"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", arXiv 2205.05131),
vectorised over a batch, packed to fixed lengths like span_corruption.py.

A denoiser turns a raw window of the packed token stream into (inputs, targets):

    kind  mode token  task                                                   t5x/seqio preprocessor
    R     [NLU]       regular span corruption: short spans, 15% noise        span_corruption
    X     [NLG]       extreme span corruption: long spans and/or 50% noise   span_corruption
    S     [S2S]       sequential denoising: prefix LM, the target continues  prefix_lm
                      the inputs

R and X are `span_corrupt` with their own noise density and mean span length (the math lives in
span_corruption.py only); S is T5's prefix LM. The mode token names the task to the model (UL2's "mode
switching", paper sec. 3.2): it is prepended to the inputs, as UL2's `ul2_objective` (paper appendix) does with
`optional_task_prefixes`. With raw window `a b c d e f g h`:

    R/X  inputs  [NLU] a b <X0> e f g <X1> </s>      targets  <X0> c d <X1> h </s>
    S    inputs  [S2S] a b c d </s>                  targets  e f g h </s>

A mixture is written `KIND:MEAN_SPAN:RATE:WEIGHT` for R and X and `S:RATE:WEIGHT` for S, comma-separated;
weights are relative shares of the rows; for S, RATE is the fraction of the raw window that goes to the targets.
The default is the paper's seven denoisers (sec. 3.1.2): R (3, 15%), (8, 15%); X (3, 50%), (8, 50%),
(64, 15%), (64, 50%); and S, with 40% of the rows R, 40% X and 20% S, as in the public t5x configurations of
`ul2_objective` that reproduce the paper.

Fixed lengths, nothing wasted. Every row has exactly `input_length` input tokens (mode token and EOS
included), and every batch the same target width W = the longest target of the mixture:
- R/X: the raw window is the longest whose corrupted inputs fill the inputs exactly (`compute_lengths`, T5's
  random_spans_helper). At density 0.5 T5 shortens that window by one token so that targets are not longer than
  inputs, which can leave the inputs one token short; here the unshortened window is kept (W absorbs it).
- S: T5's prefix_lm splits a window at a uniformly random point and pads both sides. Inputs here cannot be
  padded (batches carry no attention mask), so the split is fixed: the prefix fills the inputs, and the
  continuation has round(prefix * RATE / (1 - RATE)) tokens (RATE 0.5, the default and T5's prefix_lm
  noise_density: as many as the prefix). Windows start anywhere in a document (the stream is packed), so
  the split still falls at arbitrary points of the text.
- Targets shorter than W are padded with -100 (ignored by the loss). With the default mixture and mode tokens:

    denoiser    share     input_length 512, W = 511         input_length 128, W = 127
                          raw  target  padding  spans       raw  target  padding  spans
    R:3:0.15     20%      567     114      397     28       140      29       98      7
    R:8:0.15     20%      587     100      411     11       145      26      101      3
    X:3:0.5      10%      765     510        1    127       189     126        1     31
    X:8:0.5      10%      906     511        0     57       224     127        0     14
    X:64:0.15    10%      599      92      419      1       147      24      103      1
    X:64:0.5     10%     1004     511        0      8       248     127        0      2
    S:0.5        20%     1020     511        0      -       252     127        0      -

  (`Mixture.layout()` prints this table for any setting.) Two consequences worth knowing: the R and
  X:64:0.15 rows fill less than a quarter of the target width (UL2 in t5x pads to its fixed target length
  the same way), and X:64:0.15 gets a single span per window up to ~540 input tokens (T5's span count is
  round(noise / mean span), at least 1), so its spans are all the noise: 90 tokens at 512, 22 at 128.
- X:3:0.5 at 512 needs 127 sentinels; T5 has 100 (<extra_id_0..99>). Like T5's noise_span_to_unique_sentinel,
  the ids simply continue below <extra_id_99> into ordinary vocabulary pieces (the loader logs it).

Randomness: R/X draw their masks from the generator they are given; S is deterministic. Which denoiser a
row gets is drawn by `Mixture.draw` (the loader seeds it per logical reader and block, see loader.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nanot5.data import LABEL_PAD
from nanot5.data.span_corruption import compute_lengths, span_corrupt, span_counts
from nanot5.data.tokenizer import Tokenizer, load_tokenizer
from nanot5.errors import ConfigError

__all__ = ["Denoiser", "Mixture", "parse_mixture", "format_mixture", "prefix_lm", "add_mode_tokens",
           "mode_token_ids", "MODE_TOKENS", "DEFAULT_UL2_MIXTURE", "LABEL_PAD", "OBJECTIVES"]

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}  # UL2's paradigm tokens, in the order they are added
OBJECTIVES = ("span", "ul2", "prefix_lm")  # data.objective: what pre-training batches teach
# UL2's seven denoisers (Tay et al. 2022, sec. 3.1.2), 40% R / 40% X / 20% S
DEFAULT_UL2_MIXTURE = "R:3:0.15:0.2,R:8:0.15:0.2,X:3:0.5:0.1,X:8:0.5:0.1,X:64:0.15:0.1,X:64:0.5:0.1,S:0.5:0.2"


@dataclass(frozen=True)
class Denoiser:
    """One denoiser: kind R/X (span corruption) or S (prefix LM), and its share of the rows."""

    kind: str  # R | X | S
    noise_density: float  # R/X: fraction of the window's tokens that are noise; S: fraction that is the target
    mean_noise_span_length: float = 0.0  # R/X: mean length of a noise span (unused by S)
    weight: float = 1.0  # relative share of the rows in a mixture

    def __post_init__(self):
        if self.kind not in MODE_TOKENS:
            raise ValueError(f"denoiser kind {self.kind!r} is not one of R, X, S")
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"denoiser {self.spec()}: the rate must be in (0, 1), got {self.noise_density}")
        if self.kind != "S" and not self.mean_noise_span_length > 0:
            raise ValueError(f"denoiser {self.spec()}: the mean span length must be > 0")
        if not self.weight > 0:
            raise ValueError(f"denoiser {self.spec()}: the weight must be > 0, got {self.weight}")

    def spec(self) -> str:
        """The denoiser in mixture-string form, e.g. 'R:3:0.15:0.2' or 'S:0.5:0.2'."""
        if self.kind == "S":
            return f"S:{self.noise_density:g}:{self.weight:g}"
        return f"{self.kind}:{self.mean_noise_span_length:g}:{self.noise_density:g}:{self.weight:g}"

    def lengths(self, input_length: int, *, mode_token: bool) -> tuple[int, int]:
        """(raw_length, target_length): a raw window of raw_length tokens gives exactly `input_length` input
        tokens (the mode token, if any, and EOS included) and target_length target tokens (EOS included)."""
        n = input_length - int(mode_token)  # what the denoiser itself must produce
        if self.kind == "S":
            if n < 2:
                raise ValueError(f"input_length {input_length} leaves no room for a prefix")
            prefix = n - 1  # + EOS
            continuation = max(1, round(prefix * self.noise_density / (1 - self.noise_density)))
            return prefix + continuation, continuation + 1
        raw, target = compute_lengths(n, self.noise_density, self.mean_noise_span_length)
        if _span_widths(raw, self)[0] < n:  # T5's density-0.5 shortening left the inputs one token short
            raw += 1
            target = _span_widths(raw, self)[1]
        assert _span_widths(raw, self)[0] == n, (self, input_length)
        return raw, target


def _span_widths(raw_length: int, d: Denoiser) -> tuple[int, int]:
    """(inputs, targets) widths of span corruption of raw_length tokens, EOS included (not the mode token)."""
    noise, spans = span_counts(raw_length, d.noise_density, d.mean_noise_span_length)
    return raw_length - noise + spans + 1, noise + spans + 1


def parse_mixture(spec: str | Sequence[Denoiser]) -> tuple[Denoiser, ...]:
    """Denoisers of a mixture string 'R:3:0.15:0.2,...,S:0.5:0.2' (see the module docstring), or of a list."""
    if not isinstance(spec, str):
        out = tuple(spec)
        if not out or not all(isinstance(d, Denoiser) for d in out):
            raise ValueError("a mixture needs at least one Denoiser")
        return out
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        parts = [p.strip() for p in entry.split(":")]
        kind = parts[0].upper()
        want = 3 if kind == "S" else 4
        if kind not in MODE_TOKENS or len(parts) != want:
            raise ValueError(f"bad denoiser {entry!r} in mixture {spec!r}: write R:MEAN_SPAN:RATE:WEIGHT, "
                             "X:MEAN_SPAN:RATE:WEIGHT or S:RATE:WEIGHT, comma-separated")
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"bad number in denoiser {entry!r} of mixture {spec!r}") from None
        if kind == "S":
            out.append(Denoiser("S", numbers[0], weight=numbers[1]))
        else:
            out.append(Denoiser(kind, numbers[1], numbers[0], weight=numbers[2]))
    return tuple(out)


def format_mixture(denoisers: Sequence[Denoiser]) -> str:
    """The canonical mixture string (parse_mixture's inverse)."""
    return ",".join(d.spec() for d in denoisers)


def prefix_lm(tokens: np.ndarray, prefix_length: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """T5's prefix LM with a fixed split: inputs = the first prefix_length tokens + EOS, targets = the rest + EOS.

    tokens: (B, raw_length). Returns (B, prefix_length + 1) and (B, raw_length - prefix_length + 1), same dtype.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not 0 < prefix_length < tokens.shape[1]:
        raise ValueError(f"prefix_lm needs (B, L) tokens and 0 < prefix_length < L, got {tokens.shape} and "
                         f"{prefix_length}")
    batch, length = tokens.shape
    inputs = np.empty((batch, prefix_length + 1), tokens.dtype)
    inputs[:, :-1] = tokens[:, :prefix_length]
    inputs[:, -1] = eos_id
    targets = np.empty((batch, length - prefix_length + 1), tokens.dtype)
    targets[:, :-1] = tokens[:, prefix_length:]
    targets[:, -1] = eos_id
    return inputs, targets


# ----------------------------------------------------------------------------- mode tokens


def add_mode_tokens(tokenizer: str | Tokenizer, *, model_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer with UL2's mode tokens [NLU], [NLG], [S2S] appended after its last id as special tokens:
    ids V, V + 1, V + 2 for a tokenizer of V tokens (32100, 32101, 32102 for T5, whose 100 sentinels end at
    32099; T5's embedding has 32128 rows). A tokenizer that has them already (one saved by a UL2 run) is
    returned as it is. model_vocab_size: the model's embedding rows; raise a ConfigError if the ids do not fit.
    """
    tok = load_tokenizer(tokenizer)
    present = [tok.token_id(t) is not None for t in MODE_TOKENS.values()]
    if any(present) and not all(present):
        raise ValueError(f"tokenizer {tok.name!r} has only some of the mode tokens {list(MODE_TOKENS.values())}")
    if not all(present):
        tok = tok.with_special_tokens(MODE_TOKENS.values())
    if model_vocab_size is not None and len(tok) > model_vocab_size:
        raise ConfigError(f"UL2's mode tokens take the tokenizer to {len(tok)} tokens, more than the model's "
                          f"{model_vocab_size} embedding rows: set model.overwrite.vocab_size>={len(tok)} or "
                          "data.ul2_mode_tokens=false")
    return tok


def mode_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{kind: id} of the mode tokens; a clear error if the tokenizer was not extended with add_mode_tokens()."""
    ids = {kind: tokenizer.token_id(token) for kind, token in MODE_TOKENS.items()}
    if any(v is None for v in ids.values()):
        raise ValueError(f"tokenizer {tokenizer.name!r} has no UL2 mode tokens {list(MODE_TOKENS.values())}: "
                         "extend it with nanot5.data.denoisers.add_mode_tokens(tokenizer) before building the "
                         "model (so its vocabulary covers them), or turn mode tokens off")
    return ids


# ----------------------------------------------------------------------------- mixtures


class Mixture:
    """Denoisers laid out for one input length: raw window lengths, target widths, row draws, and the
    (inputs, targets) of a batch whose rows use different denoisers.

    mode_ids: {kind: token id} to prepend to the inputs (see mode_token_ids), or None for no mode tokens.
    """

    def __init__(self, denoisers: str | Sequence[Denoiser], *, input_length: int, sentinel_id: int, eos_id: int,
                 mode_ids: dict[str, int] | None = None):
        self.denoisers = parse_mixture(denoisers)
        self.input_length, self.sentinel_id, self.eos_id, self.mode_ids = input_length, sentinel_id, eos_id, mode_ids
        lengths = [d.lengths(input_length, mode_token=mode_ids is not None) for d in self.denoisers]
        self.raw_lengths = np.array([r for r, _ in lengths], np.int64)  # (K,) raw window per denoiser
        self.target_lengths = np.array([t for _, t in lengths], np.int64)  # (K,) own target length
        self.target_length = int(self.target_lengths.max())  # W: every batch's target width
        self.num_spans = [span_counts(int(r), d.noise_density, d.mean_noise_span_length)[1] if d.kind != "S"
                          else 0 for d, r in zip(self.denoisers, self.raw_lengths)]  # sentinels per row
        weights = np.array([d.weight for d in self.denoisers], np.float64)
        self.probs = weights / weights.sum()  # (K,) share of the rows
        self._cdf = np.cumsum(self.probs)

    @property
    def spec(self) -> str:
        return format_mixture(self.denoisers)

    def __len__(self) -> int:
        return len(self.denoisers)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) int64 denoiser index of each of n rows, i.i.d. with probabilities `probs` (no draw for one)."""
        if len(self.denoisers) == 1:
            return np.zeros(n, np.int64)
        u = rng.random(n)  # inverse-CDF sampling: row i gets the first denoiser whose cumulative share exceeds u_i
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.denoisers) - 1).astype(np.int64)

    def apply(self, kinds: np.ndarray, windows: dict[int, np.ndarray], rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
        """Denoise a batch. kinds: (B,) denoiser index per row; windows[k]: (rows of kind k, raw_lengths[k]),
        those rows in batch order. Denoisers run in index order on the shared generator (one span_corrupt
        call for a one-denoiser mixture, so objective=span is plain span corruption).
        Returns inputs (B, input_length) and targets (B, target_length), -100 past each row's own target."""
        if len(windows) == 1 and self.mode_ids is None:
            (k, rows), = windows.items()
            if self.target_lengths[k] == self.target_length:
                return self._denoise(k, rows, rng)
        first = next(iter(windows.values()))
        inputs = np.empty((len(kinds), self.input_length), first.dtype)
        targets = np.full((len(kinds), self.target_length), LABEL_PAD, first.dtype)
        for k in sorted(windows):
            x, y = self._denoise(k, windows[k], rng)
            rows = kinds == k
            inputs[rows] = x
            targets[rows, :y.shape[1]] = y
        return inputs, targets

    def _denoise(self, k: int, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        d = self.denoisers[k]
        if rows.shape[1] != self.raw_lengths[k]:
            raise ValueError(f"denoiser {d.spec()} needs windows of {self.raw_lengths[k]} tokens, got {rows.shape}")
        if d.kind == "S":
            x, y = prefix_lm(rows, int(self.raw_lengths[k] - self.target_lengths[k] + 1), self.eos_id)
        else:
            x, y = span_corrupt(rows, noise_density=d.noise_density, mean_noise_span_length=d.mean_noise_span_length,
                                sentinel_id=self.sentinel_id, eos_id=self.eos_id, rng=rng)
        if self.mode_ids is not None:
            with_mode = np.empty((x.shape[0], x.shape[1] + 1), x.dtype)
            with_mode[:, 0] = self.mode_ids[d.kind]
            with_mode[:, 1:] = x
            x = with_mode
        return x, y

    def layout(self) -> str:
        """A table of every denoiser's share, raw window, target length, target padding and spans per row."""
        lines = [f"input_length {self.input_length}, target width {self.target_length}, "
                 f"mode tokens {'on' if self.mode_ids is not None else 'off'}",
                 f"{'denoiser':<12} {'share':>6} {'raw':>6} {'target':>7} {'padding':>8} {'spans':>6} "
                 f"{'mean span':>10}"]
        for d, p, raw, tgt, spans in zip(self.denoisers, self.probs, self.raw_lengths, self.target_lengths,
                                         self.num_spans):
            name = d.spec().rsplit(":", 1)[0]
            mean_span = f"{(tgt - spans - 1) / spans:.1f}" if spans else "-"
            lines.append(f"{name:<12} {p:>6.3f} {raw:>6} {tgt:>7} {self.target_length - tgt:>8} "
                         f"{spans if spans else '-':>6} {mean_span:>10}")
        return "\n".join(lines)
