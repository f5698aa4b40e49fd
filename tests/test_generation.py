"""Decoding (`nanot5.generation` through `T5.generate`) against transformers' `generate` (the oracle).

Two tiny T5 v1.1 models: a random-init one built from an HF model's weights, and a directory that
transformers wrote with save_pretrained, loaded with `T5.from_hf`. Their untied heads are drawn with
std 1 (HF's init), so logits are peaky and outputs far from degenerate; EOS is a token the model
emits now and then, picked so that beam hypotheses end at many different steps. Inputs are padded
batches (rows of different lengths, attention mask). All in fp32, where tokens must be identical.

Shape conventions: ours returns only the new tokens; HF prepends the decoder start token (dropped
here) and its beam search fills positions after EOS with EOS (its fill value `pad or eos` takes
EOS when pad_token_id is 0), ours with pad; `norm` maps both to pad after the first EOS.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import T5Config as HFConfig  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402

from nanot5 import T5  # noqa: E402
from nanot5.generation import (  # noqa: E402
    DecoderState,
    banned_ngram_mask,
    top_k_filter,
    top_p_filter,
)
from tests.test_model import ours_from  # noqa: E402  (an HF model's twin, same weights)

VOCAB = 128
MAX_NEW = 16
PAD = 0


def hf_tiny(seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=40,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=PAD, eos_token_id=1,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg).eval()
    # transformers >= 5 shares lm_head with the embedding at construction; untie it, HF's init (std 1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model


def padded_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 5:] = 0
    mask[3, 20:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def first_eos_lengths(out: torch.Tensor, eos: int) -> list[int]:
    """Per row: new tokens up to and including the first EOS, or the row length when none."""
    return [int((r == eos).nonzero()[0]) + 1 if (r == eos).any() else r.shape[0] for r in out]


def pick_eos(model: T5, ids, mask) -> int:
    """A token the model emits now and then whose 4-beam hypotheses end at the most different steps."""
    free = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=-1)
    best = (-1, -1)
    for tok, _ in collections.Counter(free.flatten().tolist()).most_common(16):
        hyps = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=tok, num_beams=4,
                              num_return_sequences=4)
        best = max(best, (len(set(first_eos_lengths(hyps, tok))), tok))
    return best[1]


@dataclass
class Pair:
    """Our model and HF's with the same weights, the inputs, and the EOS both use."""
    ours: T5
    hf: T5ForConditionalGeneration
    eos: int
    eos_in_config: bool  # from_hf: EOS comes from config.json, the calls pass none
    ids: torch.Tensor
    mask: torch.Tensor

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        is_eos = (x == self.eos).long()
        return x.masked_fill(is_eos.cumsum(1) - is_eos > 0, PAD)

    def run_ours(self, **kw) -> torch.Tensor:
        kw.setdefault("max_new_tokens", MAX_NEW)
        if not self.eos_in_config:
            kw["eos_token_id"] = self.eos
        return self.ours.generate(self.ids, attention_mask=self.mask, **kw)

    def run_hf(self, **kw) -> torch.Tensor:
        kw.setdefault("max_new_tokens", MAX_NEW)
        if not self.eos_in_config:
            kw["eos_token_id"] = self.eos
        if kw.get("do_sample"):
            kw.setdefault("top_k", 0)  # HF's default is 50, ours 0 (off)
        else:
            kw["do_sample"] = False
        out = self.hf.generate(input_ids=self.ids, attention_mask=self.mask, pad_token_id=PAD, **kw)
        assert (out[:, 0] == self.hf.config.decoder_start_token_id).all()
        return out[:, 1:]

    def assert_same(self, ours: torch.Tensor, ref: torch.Tensor) -> None:
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        assert torch.equal(self.norm(ours), self.norm(ref)), (ours, ref)
        # ours pads with pad_token_id after EOS
        assert torch.equal(self.norm(ours), ours)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run thousands of small ops: one thread is faster, and on a loaded machine two
    threads' OpenMP barriers make them 10-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["random_init", "from_hf"])
def pair(request, tmp_path_factory) -> Pair:
    ids, mask = padded_inputs()
    if request.param == "random_init":
        hf = hf_tiny(seed=0)
        ours = ours_from(hf)
        return Pair(ours, hf, pick_eos(ours, ids, mask), False, ids, mask)
    src = hf_tiny(seed=1)
    eos = pick_eos(ours_from(src), ids, mask)
    src.config.eos_token_id = src.generation_config.eos_token_id = eos
    path = tmp_path_factory.mktemp("hf_t5")
    src.save_pretrained(path)
    ours = T5.from_hf(path).eval()
    assert ours.config.eos_token_id == eos
    return Pair(ours, T5ForConditionalGeneration.from_pretrained(path).eval(), eos, True, ids, mask)


def test_greedy_matches_transformers(pair):
    ref = pair.run_hf(num_beams=1)
    pair.assert_same(pair.run_ours(), ref)
    lengths = first_eos_lengths(ref, pair.eos)
    assert min(lengths) < MAX_NEW  # some rows stop at EOS


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_beam_search_matches_transformers(pair, length_penalty, early_stopping):
    kw = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    # all 4 finished hypotheses of each input, best first, not just the best
    ref = pair.run_hf(num_return_sequences=4, **kw)
    got = pair.run_ours(num_return_sequences=4, **kw)
    pair.assert_same(got, ref)
    # hypotheses ended at many different steps, some at EOS and some at max_new_tokens
    lengths = first_eos_lengths(ref, pair.eos)
    assert len(set(lengths)) >= 3 and min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, lengths
    # the default (best hypothesis only) is the first of each input's hypotheses
    best = pair.run_ours(**kw)
    assert torch.equal(best, got[::4, :best.shape[1]]) and (got[::4, best.shape[1]:] == PAD).all()
    pair.assert_same(best, pair.run_hf(**kw))


def test_beam_search_without_eos_matches_transformers(pair):
    """eos_token_id < 0 never stops early (HF: eos_token_id None): every hypothesis has max_new_tokens."""
    saved = pair.hf.generation_config.eos_token_id
    pair.hf.generation_config.eos_token_id = None
    try:
        ref = pair.hf.generate(input_ids=pair.ids, attention_mask=pair.mask, max_new_tokens=MAX_NEW, do_sample=False,
                               num_beams=4, num_return_sequences=4, pad_token_id=PAD)[:, 1:]
    finally:
        pair.hf.generation_config.eos_token_id = saved
    got = pair.ours.generate(pair.ids, attention_mask=pair.mask, max_new_tokens=MAX_NEW, eos_token_id=-1,
                             num_beams=4, num_return_sequences=4)
    assert got.shape == (16, MAX_NEW) and torch.equal(got, ref)


def test_beam_settings_are_exercised(pair):
    """The parity cases above differ from each other: length penalty and early stopping matter here."""
    outs = {(lp, es): pair.run_ours(num_beams=4, num_return_sequences=4, length_penalty=lp, early_stopping=es)
            for lp in (1.0, 0.6) for es in (False, True, "never")}
    for es in (False, True, "never"):
        assert not torch.equal(outs[1.0, es], outs[0.6, es])
    for lp in (1.0, 0.6):
        assert not torch.equal(outs[lp, True], outs[lp, False])


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("kw", [dict(min_new_tokens="tight"), dict(min_new_tokens=8), dict(no_repeat_ngram_size=2),
                                dict(no_repeat_ngram_size=3, min_new_tokens=5), dict(no_repeat_ngram_size=1)],
                         ids=["min_tight", "min8", "ngram2", "ngram3_min5", "ngram1"])
def test_min_new_tokens_and_no_repeat_ngram_match_transformers(pair, kw, num_beams):
    if kw.get("min_new_tokens") == "tight":  # exactly the length of the shortest unconstrained output:
        # its EOS, at step min_new_tokens - 1, is the first one suppressed (an off-by-one lets it through)
        kw = dict(min_new_tokens=min(first_eos_lengths(pair.run_ours(num_beams=num_beams), pair.eos)))
    got = pair.run_ours(num_beams=num_beams, **kw)
    pair.assert_same(got, pair.run_hf(num_beams=num_beams, **kw))
    assert not torch.equal(got, pair.run_ours(num_beams=num_beams))  # the constraint changed the result
    if "min_new_tokens" in kw:
        assert min(first_eos_lengths(got, pair.eos)) > kw["min_new_tokens"]
    if "no_repeat_ngram_size" in kw:  # no n-gram occurs twice in a row's decoder inputs (start token first)
        n = kw["no_repeat_ngram_size"]
        for row in pair.norm(got):
            tokens = [0] + row[:first_eos_lengths(row[None], pair.eos)[0]].tolist()
            grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
            assert len(grams) == len(set(grams)), tokens


SAMPLING = [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
            dict(temperature=1.5, top_k=20, top_p=0.9, min_new_tokens=3, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kw", SAMPLING, ids=["plain", "temperature", "top_k", "top_p", "all"])
def test_sampling_matches_transformers_with_the_same_seed(pair, kw, num_beams):
    """HF samples from the global RNG with the same kernels: torch.manual_seed(s) there equals
    generator=torch.Generator().manual_seed(s) here, so the filtered distributions must be equal."""
    torch.manual_seed(1234)
    ref = pair.run_hf(do_sample=True, num_beams=num_beams, **kw)
    got = pair.run_ours(do_sample=True, num_beams=num_beams, generator=torch.Generator().manual_seed(1234), **kw)
    pair.assert_same(got, ref)
    torch.manual_seed(1234)
    ref = pair.run_hf(do_sample=True, num_beams=num_beams, num_return_sequences=2, **kw)
    got = pair.run_ours(do_sample=True, num_beams=num_beams, num_return_sequences=2,
                        generator=torch.Generator().manual_seed(1234), **kw)
    pair.assert_same(got, ref)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(pair, num_beams):
    def sample(seed):
        return pair.run_ours(do_sample=True, num_beams=num_beams, temperature=2.0, top_p=0.95,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    torch.manual_seed(0)  # the global RNG is not used
    a = sample(7)
    torch.manual_seed(1)
    assert torch.equal(a, sample(7))


def test_top_k_one_and_tiny_top_p_sampling_equal_greedy(pair):
    greedy = pair.run_ours()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pair.run_ours(do_sample=True, top_k=1, temperature=2.0, generator=g), greedy)
    assert torch.equal(pair.run_ours(do_sample=True, top_p=1e-6, temperature=2.0, generator=g), greedy)


@pytest.mark.parametrize("filt", [dict(top_k=3), dict(top_p=0.6), dict(top_k=4, top_p=0.7)],
                         ids=["top_k", "top_p", "both"])
def test_sampled_tokens_stay_inside_the_filtered_set(pair, filt):
    """Teacher-force the samples through the model to get each step's distribution and check that
    every sampled token lies inside the top-k / top-p set of that distribution (reference formulas)."""
    temperature, r = 1.5, 8
    out = pair.run_ours(do_sample=True, temperature=temperature, num_return_sequences=r,
                        generator=torch.Generator().manual_seed(3), **filt)
    ids, mask = pair.ids.repeat_interleave(r, 0), pair.mask.repeat_interleave(r, 0)
    dec_in = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)  # start token, then the samples
    with torch.no_grad():
        logits = pair.ours(ids, attention_mask=mask, decoder_input_ids=dec_in).logits / temperature
    lengths = first_eos_lengths(out, pair.eos)
    checked, distinct = 0, collections.defaultdict(set)
    for i, n in enumerate(lengths):
        for t in range(n):
            tok, row = int(out[i, t]), logits[i, t]
            distinct[i // r, t].add(tok)
            tol = 1e-4  # cached vs full-sequence logits differ by rounding; never a real boundary here
            if "top_k" in filt:  # fewer than k tokens are more likely
                assert int((row > row[tok] + tol).sum()) < filt["top_k"], (i, t)
            if "top_p" in filt:  # the more likely tokens hold less than top_p of the mass
                probs = row.softmax(-1)
                assert float(probs[probs > probs[tok] + tol].sum()) < filt["top_p"] + tol, (i, t)
            checked += 1
    assert checked > 100 and max(len(s) for s in distinct.values()) > 1  # it does sample, not argmax


def test_filters_match_reference_formulas():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=g) * 2
    scores[:8, :5] = 3.0  # ties at the top
    for k in (1, 3, 7, 50, 80):
        for min_keep in (1, 2):
            got = top_k_filter(scores, k, min_keep)
            for row, out in zip(scores, got):
                kth = sorted(row.tolist(), reverse=True)[min(max(k, min_keep), 50) - 1]
                keep = row >= kth  # everything at least as large as the k-th largest, ties included
                assert torch.equal(out, row.masked_fill(~keep, float("-inf")))
    assert torch.equal(top_k_filter(scores, 0), scores)
    distinct = scores[8:]  # with ties the nucleus is ambiguous (which of equal tokens goes first)
    for p in (0.05, 0.3, 0.9, 0.999, 1.0):
        for min_keep in (1, 2):
            got = top_p_filter(distinct, p, min_keep)
            for row, out in zip(distinct, got):
                probs = row.double().softmax(-1)
                order = probs.argsort(descending=True).tolist()
                kept, mass = [], 0.0
                for j in order:  # most likely first, until the kept mass reaches p
                    if mass >= p and len(kept) >= min_keep:
                        break
                    kept.append(j)
                    mass += float(probs[j])
                keep = torch.zeros(50, dtype=torch.bool)
                keep[kept] = True
                assert torch.equal(out, row.masked_fill(~keep, float("-inf"))), (p, min_keep)


def test_banned_ngram_mask_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, 4, (32, 12), generator=g)  # 4 symbols: many repeats
    for n in (1, 2, 3, 4):
        for L in (1, n - 1, n, 12):
            if L < 1:
                continue
            h = history[:, :L]
            got = banned_ngram_mask(h, n, 6)
            for row, mask in zip(h.tolist(), got if got is not None else [None] * len(h)):
                want = {row[s + n - 1] for s in range(L - n + 1) if row[s:s + n - 1] == row[L - n + 1:]}
                if got is None:
                    assert L < n
                else:
                    assert set(mask.nonzero().flatten().tolist()) == want


def test_zero_new_tokens_and_bf16_beams():
    hf = hf_tiny(seed=0)
    ours = ours_from(hf)
    ids, mask = padded_inputs()
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=0, num_beams=4).shape == (4, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 8 and out.dtype == torch.long


def test_bad_arguments_raise_clear_errors():
    ours = ours_from(hf_tiny(seed=0))
    ids, mask = padded_inputs()
    cases = [
        (dict(input_ids=ids[0]), "input_ids must be a 2-D"),
        (dict(input_ids=ids.float()), "integer token ids"),
        (dict(input_ids=ids + VOCAB), r"input_ids must be in \[0, vocab_size=128\)"),
        (dict(input_ids=ids - 3), r"input_ids must be in \[0"),
        (dict(attention_mask=mask[:, :5]), "attention_mask must have input_ids' shape"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
        (dict(min_new_tokens=20, max_new_tokens=10), "min_new_tokens must be an int in"),
        (dict(num_beams=0), "num_beams must be an int >= 1"),
        (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        (dict(length_penalty="long"), "length_penalty must be a finite number"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size must be an int >= 0"),
        (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
        (dict(do_sample=True, top_k=-1), "top_k must be an int >= 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be <= num_beams=2"),
        (dict(do_sample=True, generator=123), "generator must be a torch.Generator"),
        (dict(eos_token_id="</s>"), "eos_token_id must be an int"),
    ]
    import numpy as np  # NumPy numbers (e.g. from a config) are accepted
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=np.int64(3), num_beams=np.int64(2),
                        length_penalty=np.float32(0.5))
    assert out.shape[0] == 4 and out.shape[1] <= 3
    for kw, match in cases:
        args = dict(input_ids=ids, attention_mask=mask)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            ours.generate(args.pop("input_ids"), **args)


def test_beam_step_with_shared_cross_attention_equals_block_forward():
    """Beam steps attend with each input's beams as one query block against its encoder k/v; that
    must equal `Block.forward` on per-beam copies of the encoder output (the plain path)."""
    ours = ours_from(hf_tiny(seed=0))
    ids, mask = padded_inputs()
    beams, steps = 3, 5
    with torch.no_grad():
        memory = ours.encode(ids, mask)
        shared = DecoderState(ours, memory, mask, beams, steps)
        plain = DecoderState(ours, memory.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0), 1, steps)
        g = torch.Generator().manual_seed(0)
        for t in range(steps):
            tokens = torch.randint(0, VOCAB, (4 * beams, 1), generator=g)
            a, b = shared.step(tokens, t), plain.step(tokens, t)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
            rows = torch.randint(0, beams, (4, beams), generator=g) + torch.arange(4)[:, None] * beams
            shared.reorder(rows.flatten(), t)
            plain.reorder(rows.flatten(), t)
