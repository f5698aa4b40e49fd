"""Pre-training loader: batches are span-corrupted windows of the packed token stream; logical readers
read every document exactly once per epoch; the global micro-batch does not depend on how many ranks and
workers read it; resuming from state_dict() (or from every rank's state on another world size) continues
the exact stream."""

from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nanot5.data import compute_lengths
from nanot5.data.loader import PretrainLoader
from nanot5.data.sources import DataError
from nanot5.data.tokenizer import load_tokenizer

INPUT_LENGTH = 64
RAW, TARGET = compute_lengths(INPUT_LENGTH, 0.15, 3.0)  # raw window and target lengths
GLOBAL = 8  # global micro-batch (batch_size * world_size) of the multi-rank tests


@pytest.fixture(scope="module")
def tok(t5_tokenizer_dir):
    return load_tokenizer(t5_tokenizer_dir)


@pytest.fixture(scope="module")
def c4_path(c4_dir: Path) -> Path:
    return c4_dir / "c4-train.sample.jsonl.gz"


@pytest.fixture(scope="module")
def c4_docs(c4_path) -> list[str]:
    with gzip.open(c4_path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture
def small_corpus(tmp_path, c4_docs) -> Path:
    """40 short documents: an epoch is about 20 windows, so tests cross epochs quickly."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": d[:200]}) + "\n" for d in c4_docs[:40]), encoding="utf-8")
    return path


def merge(inputs: torch.Tensor, targets: torch.Tensor, first_sentinel: int, eos: int) -> list[list[int]]:
    """Undo span corruption: each sentinel in an input row is replaced by the tokens that follow the same
    sentinel in the target row; trailing EOS dropped. Sentinels are ids > first_sentinel - 100."""
    rows = []
    for inp, tgt in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert inp[-1] == eos and tgt[-1] == eos
        spans, current = {}, None
        for t in tgt[:-1]:
            if t > first_sentinel - 100:
                current = spans.setdefault(t, [])
            else:
                current.append(t)
        row = []
        for t in inp[:-1]:
            row.extend(spans.pop(t) if t > first_sentinel - 100 else [t])
        assert not spans  # every target span was used exactly once
        rows.append(row)
    return rows


def windows_of(docs: list[str], tok, raw_length: int) -> list[tuple[int, ...]]:
    """Reference packing: tokenize each document, append EOS, concatenate, cut into raw_length windows."""
    stream = [t for ids in tok.encode_batch(docs) for t in ids + [tok.eos_id]]
    n = len(stream) // raw_length
    return [tuple(stream[i * raw_length:(i + 1) * raw_length]) for i in range(n)]


def make(source, tok, **kw) -> PretrainLoader:
    # small tokenization chunks: fast starts, and many chunk boundaries for the resume cursors
    kw = {"input_length": INPUT_LENGTH, "batch_size": 8, "seed": 1234, "docs_per_chunk": 16, **kw}
    return PretrainLoader(str(source), tok, **kw)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"input_ids", "labels"}
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def join(parts: list[dict | None]) -> dict:
    """One global batch from the ranks' batches of a step, in rank order (None: a rank that ran out)."""
    parts = [p for p in parts if p is not None]
    return {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "labels")}


def global_batches(source, tok, *, world_size: int, steps: int | None = None, **kw) -> list[dict]:
    """The first `steps` global micro-batches of GLOBAL rows read by `world_size` ranks: each rank's loader
    on its own (as in separate processes), joined per step in rank order."""
    per_rank = [list(itertools.islice(make(source, tok, rank=r, world_size=world_size,
                                           batch_size=GLOBAL // world_size, **kw), steps))
                for r in range(world_size)]
    return [join(list(parts)) for parts in itertools.zip_longest(*per_rank)]


def rows_of(batches: list[dict]) -> list[tuple[int, ...]]:
    """The raw windows of batches, in order (span corruption undone)."""
    return [tuple(r) for b in batches for r in merge(b["input_ids"], b["labels"], 32099, 1)]


def test_batches_are_corrupted_windows_of_the_packed_stream(c4_path, c4_docs, tok):
    loader = make(c4_path, tok, shuffle_buffer=0, infinite=False, max_batches=3)
    assert (loader.raw_length, loader.target_length) == (RAW, TARGET)
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].shape == (8, INPUT_LENGTH) and b["labels"].shape == (8, TARGET)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long
    got = [tuple(r) for b in batches for r in merge(b["input_ids"], b["labels"], 32099, 1)]
    # no shuffle: the first 24 windows of the concatenated documents, in order
    assert got == windows_of(c4_docs[:30], tok, RAW)[:24]
    for b in batches:  # sentinels count down from <extra_id_0> in the inputs
        for row in b["input_ids"].tolist():
            sentinels = [t for t in row if t >= 32000]
            assert sentinels == list(range(32099, 32099 - len(sentinels), -1))


def test_readers_read_every_document_once(c4_path, c4_docs, tok):
    """One epoch of the C4 sample over R=4 logical readers on 2 ranks x 2 workers: reader j packs documents
    j, j+4, ... (the source's round-robin); together the readers' windows are exactly the windows of those
    four document streams, every window once. (Finite passes equal single-process ones: see the
    evaluation test below, which is cheaper.)"""
    batches = global_batches(c4_path, tok, world_size=2, num_workers=2, num_readers=4, shuffle_buffer=64,
                             infinite=False)
    expected = Counter()
    for j in range(4):
        expected.update(windows_of(c4_docs[j::4], tok, RAW))
    assert Counter(rows_of(batches)) == expected
    # readers run out at different steps: the last global batches hold what the remaining readers have
    sizes = [b["input_ids"].shape[0] for b in batches]
    assert sizes[0] == GLOBAL and sizes == sorted(sizes, reverse=True) and sizes[-1] < GLOBAL
    # and the four readers' documents partition the corpus
    assert sorted(i for r in range(4) for i in range(r, len(c4_docs), 4)) == list(range(len(c4_docs)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_global_batch_is_reader_order_slices(c4_path, c4_docs, tok, num_workers):
    """Oracle for the layout: rows [2j, 2j+2) of global batch t are reader j's sub-batch t, i.e. windows
    2t, 2t+1 of its first shuffle block (the first 16 windows of documents j, j+4, ...) in the order of the
    permutation seeded by (seed, j, block 0)."""
    seed, block = 1234, 16
    batches = list(itertools.islice(make(c4_path, tok, num_readers=4, num_workers=num_workers,
                                         shuffle_buffer=block, seed=seed), 5))
    for j in range(4):
        first_block = windows_of(c4_docs[j::4][:40], tok, RAW)[:block]
        order = np.random.default_rng([seed, j, 0, 0]).permutation(block)
        got = rows_of([{k: b[k][2 * j:2 * j + 2] for k in b} for b in batches])
        assert got == [first_block[i] for i in order[:10]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # 4 workers on 2 cores
@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 2), (1, 4), (2, 0), (2, 2), (4, 0), (4, 1)])
def test_global_batches_do_not_depend_on_ranks_or_workers(c4_path, tok, world_size, num_workers):
    """The acceptance point behind "N processes train like 1": for R=4 and a global batch of 8, every
    (world_size, num_workers) layout gives the global micro-batches of 1 process without workers,
    corruption included (its generator is seeded by reader and sub-batch, never by rank or worker)."""
    kw = dict(num_readers=4, shuffle_buffer=16)
    reference = global_batches(c4_path, tok, world_size=1, steps=5, **kw)
    assert len(reference) == 5 and all(b["input_ids"].shape == (GLOBAL, INPUT_LENGTH) for b in reference)
    got = global_batches(c4_path, tok, world_size=world_size, num_workers=num_workers, steps=5, **kw)
    assert_same_batches(got, reference)


@pytest.mark.parametrize(("num_workers", "resume_workers"), [(0, 0), (2, 2), (2, 0)])
def test_resume_gives_the_uninterrupted_stream(c4_path, tok, num_workers, resume_workers):
    # 4 readers, sub-batches of 2 windows, shuffle blocks of 5: sub-batches straddle blocks. The state is per
    # logical reader, so it also resumes with another number of workers.
    kw = dict(num_readers=4, shuffle_buffer=5)
    k = 7
    reference = list(itertools.islice(make(c4_path, tok, num_workers=num_workers, **kw), k + 5))
    first = make(c4_path, tok, num_workers=num_workers, **kw)
    it = iter(first)
    assert_same_batches([next(it) for _ in range(k)], reference[:k])
    state = first.state_dict()
    del it
    assert state["step"] == k and sorted(state["readers"]) == [0, 1, 2, 3]
    resumed = make(c4_path, tok, num_workers=resume_workers, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states survive JSON (and torch.save)
    it = iter(resumed)
    assert_same_batches([next(it) for _ in range(5)], reference[k:])
    # a second resume from the resumed loader's state continues the same stream
    again = make(c4_path, tok, num_workers=num_workers, **kw)
    again.load_state_dict(resumed.state_dict())
    assert_same_batches([next(iter(again))], [next(it)])


@pytest.mark.parametrize("new_world_size", [1, 4])
def test_resume_on_another_world_size(c4_path, tok, new_world_size):
    """A run on 2 ranks stops after k steps; every rank's state_dict is gathered; a run on 1 (or 4) ranks
    picks its readers' states and continues with the global batches the 2-rank run would have produced."""
    kw = dict(num_readers=4, shuffle_buffer=5)
    k = 7
    reference = global_batches(c4_path, tok, world_size=2, steps=k + 5, **kw)
    states = []
    for rank in range(2):
        loader = make(c4_path, tok, rank=rank, world_size=2, batch_size=GLOBAL // 2, **kw)
        list(itertools.islice(loader, k))
        states.append(json.loads(json.dumps(loader.state_dict())))
    resumed = []
    for rank in range(new_world_size):
        loader = make(c4_path, tok, rank=rank, world_size=new_world_size, batch_size=GLOBAL // new_world_size,
                      num_workers=2 if new_world_size == 1 else 0, **kw)
        loader.load_resharded_state(states[::-1])  # any order of the ranks' states
        resumed.append(list(itertools.islice(loader, 5)))
        assert loader.state_dict()["step"] == k + 5
    assert_same_batches([join(list(parts)) for parts in zip(*resumed, strict=True)], reference[k:])


def test_resume_at_every_step_across_epochs(small_corpus, tok):
    # two readers of ~10 windows each: their epochs end at different steps
    kw = dict(shuffle_buffer=6, batch_size=4, num_readers=2)
    loader = make(small_corpus, tok, **kw)
    stream, states = [], []
    for batch in loader:
        stream.append(batch)
        states.append(loader.state_dict())
        if len(stream) == 16:
            break
    assert loader.epoch >= 2  # the corpus has only ~20 windows: several epochs were crossed
    for k in range(len(stream) - 3):
        resumed = make(small_corpus, tok, **kw)
        resumed.load_state_dict(states[k])
        it = iter(resumed)
        assert_same_batches([next(it) for _ in range(3)], stream[k + 1:k + 4])


def test_epochs_repeat_windows_in_a_new_order(small_corpus, c4_docs, tok):
    loader = make(small_corpus, tok, shuffle_buffer=1000, batch_size=1)
    expected = windows_of([d[:200] for d in c4_docs[:40]], tok, RAW)
    it = iter(loader)
    epochs = [[tuple(merge(*next(it).values(), 32099, 1)[0]) for _ in expected] for _ in range(2)]
    assert Counter(epochs[0]) == Counter(epochs[1]) == Counter(expected)
    assert epochs[0] != epochs[1] and epochs[0] != expected  # shuffled, differently per epoch


def test_seed_determinism_and_finite_repeatability(c4_path, tok):
    def first(seed, **kw):
        return next(iter(make(c4_path, tok, seed=seed, shuffle_buffer=32, **kw)))

    assert_same_batches([first(5)], [first(5)])
    assert not torch.equal(first(5)["input_ids"], first(6)["input_ids"])
    evaluation = make(c4_path, tok, shuffle_buffer=0, infinite=False, max_batches=4)
    a, b = list(evaluation), list(evaluation)
    assert len(a) == 4
    assert_same_batches(a, b)  # evaluation batches are identical every time


def test_evaluation_batches_are_repeatable_and_rank_independent(small_corpus, c4_docs, tok):
    """Finite passes (evaluation) with 4 readers: the same batches on every iter(), also with worker
    processes hosting two readers each; and the ranks of a 2- or 4-process run together see the rows of
    the single-process pass, step by step, with or without max_batches."""
    kw = dict(num_readers=4, shuffle_buffer=3, infinite=False)
    single = make(small_corpus, tok, num_workers=2, **kw)
    a, b = list(single), list(single)
    assert_same_batches(a, b)
    assert_same_batches(a, list(make(small_corpus, tok, **kw)))
    expected = Counter()
    for j in range(4):
        expected.update(windows_of([d[:200] for d in c4_docs[:40]][j::4], tok, RAW))
    assert Counter(rows_of(a)) == expected
    assert a[-1]["input_ids"].shape[0] < GLOBAL  # short sub-batches at the end of the pass
    assert_same_batches(global_batches(small_corpus, tok, world_size=2, **kw), a)
    assert_same_batches(global_batches(small_corpus, tok, world_size=4, num_workers=1, **kw), a)
    assert_same_batches(global_batches(small_corpus, tok, world_size=2, max_batches=2, **kw), a[:2])


def test_finite_pass_covers_the_whole_source(small_corpus, c4_docs, tok):
    loader = make(small_corpus, tok, shuffle_buffer=0, infinite=False, batch_size=8)
    batches = list(loader)
    rows = [tuple(r) for b in batches for r in merge(b["input_ids"], b["labels"], 32099, 1)]
    assert rows == windows_of([d[:200] for d in c4_docs[:40]], tok, RAW)
    assert batches[-1]["input_ids"].shape[0] == len(rows) - 8 * (len(batches) - 1)  # a short last batch


def test_state_must_match_the_loader(c4_path, tok):
    state = make(c4_path, tok).state_dict()
    with pytest.raises(ValueError, match="batch_size was 8 in the checkpoint, now 4"):
        make(c4_path, tok, batch_size=4).load_state_dict(state)
    # 2 workers default to 2 logical readers: a different stream, so its state does not fit
    with pytest.raises(ValueError, match="num_readers was 1 in the checkpoint, now 2: build the loader with "
                                         "num_readers=1"):
        make(c4_path, tok, num_workers=2).load_state_dict(state)


def test_reader_layout_errors_name_the_settings(c4_path, tok):
    with pytest.raises(ValueError, match="num_readers=3 is not a multiple of world_size=2"):
        make(c4_path, tok, num_readers=3, world_size=2)
    with pytest.raises(ValueError, match=r"batch_size=6 \(per rank\) is not a multiple of num_readers / "
                                         r"world_size = 8 / 2 = 4"):
        make(c4_path, tok, num_readers=8, world_size=2, batch_size=6)
    with pytest.raises(ValueError, match="num_workers=3 does not divide the 4 logical readers of a rank"):
        make(c4_path, tok, num_readers=4, num_workers=3)
    with pytest.raises(ValueError, match="num_readers must be >= 1"):
        make(c4_path, tok, num_readers=0)


def test_resharded_state_must_match(c4_path, tok):
    kw = dict(num_readers=4, shuffle_buffer=8)
    ranks = [make(c4_path, tok, rank=r, world_size=2, batch_size=4, **kw) for r in range(2)]
    states = [r.state_dict() for r in ranks]
    one = make(c4_path, tok, **kw)
    with pytest.raises(ValueError, match="world_size was 2 in the checkpoint, now 1: resume with "
                                         "load_resharded_state"):
        one.load_state_dict(states[0])
    with pytest.raises(ValueError, match=r"global_batch was 8 in the checkpoint, now 4 \(batch_size \* world_size"):
        make(c4_path, tok, batch_size=4, **kw).load_resharded_state(states)
    with pytest.raises(ValueError, match="num_readers was 4 in the checkpoint, now 8"):
        make(c4_path, tok, num_readers=8, shuffle_buffer=8).load_resharded_state(states)
    with pytest.raises(ValueError, match=r"lack readers \[2, 3\] of 4: pass the data states of all ranks"):
        one.load_resharded_state(states[:1])
    with pytest.raises(ValueError, match="reader 0 is in two of the given states"):
        one.load_resharded_state([states[0], states[0], states[1]])
    with pytest.raises(ValueError, match="needs the data states of every rank"):
        one.load_resharded_state([])
    next(iter(ranks[1]))
    with pytest.raises(ValueError, match=r"different steps \[0, 1\]"):
        one.load_resharded_state([states[0], ranks[1].state_dict()])
    with pytest.raises(ValueError, match="version 1 != 2"):
        one.load_state_dict({**one.state_dict(), "version": 1})


def test_bad_records_in_the_loader(tmp_path, c4_docs, tok):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in c4_docs[:20]]
    lines[3] = '{"text": oops}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 4: malformed JSON"):
        next(iter(make(path, tok)))
    loader = make(path, tok, on_error="skip", shuffle_buffer=0, infinite=False)
    rows = [tuple(r) for b in loader for r in merge(b["input_ids"], b["labels"], 32099, 1)]
    assert rows == windows_of(c4_docs[:3] + c4_docs[4:20], tok, RAW)
    assert loader.skipped == {"malformed_json": 1}


def test_too_little_data_for_a_window(tmp_path, tok):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "just a few words"}\n')
    with pytest.raises(DataError, match="less than one window"):
        next(iter(make(path, tok)))


# ----------------------------------------------------------------------------------------------------------
# UL2's mixture of denoisers (objective=ul2) and prefix LM: the same guarantees with one raw length per denoiser


@pytest.fixture(scope="module")
def ul2_tok(tok):
    from nanot5.data.denoisers import add_mode_tokens

    return add_mode_tokens(tok)


def ul2_rows(batches: list[dict], mix) -> list[tuple[str, int, tuple[int, ...]]]:
    """(kind, denoiser raw length, raw window) of every row, by undoing its denoiser (test_denoisers.undo)."""
    from tests.test_denoisers import undo

    rows = []
    for b in batches:
        assert b["input_ids"].shape[1] == INPUT_LENGTH and b["labels"].shape[1] == mix.target_length
        for inp, lab in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
            kind, raw, _ = undo(inp, lab)
            rows.append((kind, len(raw), tuple(raw)))
    return rows


def test_ul2_batches_are_denoised_windows_of_the_packed_stream(c4_path, c4_docs, ul2_tok):
    """Without a shuffle, the rows given back by undoing each row's denoiser are consecutive pieces of the
    packed stream, and the k-th window has the raw length and mode token of the k-th denoiser drawn for
    its block (generator seeded by (seed, reader 0, 2, block); blocks of 64 windows)."""
    loader = make(c4_path, ul2_tok, objective="ul2", shuffle_buffer=0, infinite=False, max_batches=12)
    mix = loader.mixture
    assert loader.raw_length is None and loader.target_length == mix.target_length == 63
    rows = ul2_rows(list(loader), mix)
    assert len(rows) == 96
    stream = [t for ids in ul2_tok.encode_batch(c4_docs[:60]) for t in ids + [ul2_tok.eos_id]]
    assert [t for _, _, raw in rows for t in raw] == stream[:sum(n for _, n, _ in rows)]
    kinds = np.concatenate([mix.draw(np.random.default_rng([1234, 0, 2, b]), 64) for b in range(2)])[:96]
    assert [(kind, n) for kind, n, _ in rows] == [(mix.denoisers[k].kind, int(mix.raw_lengths[k])) for k in kinds]
    assert {kind for kind, _, _ in rows} == {"R", "X", "S"}


def test_prefix_lm_objective(c4_path, c4_docs, tok):
    """objective=prefix_lm: no mode token, inputs = input_length - 1 tokens + EOS, targets the next
    input_length - 1 tokens + EOS; the tokenizer needs neither mode tokens nor (here) anything else."""
    from tests.test_denoisers import undo

    loader = make(c4_path, tok, objective="prefix_lm", shuffle_buffer=0, infinite=False, max_batches=2)
    assert (loader.raw_length, loader.target_length) == (2 * (INPUT_LENGTH - 1), INPUT_LENGTH)
    batches = list(loader)
    rows = [undo(i, l, kind="S", mode=False)[1] for b in batches
            for i, l in zip(b["input_ids"].tolist(), b["labels"].tolist())]
    assert [tuple(r) for r in rows] == windows_of(c4_docs[:30], tok, 2 * (INPUT_LENGTH - 1))[:16]
    assert all((b["labels"] != -100).all() for b in batches)  # one denoiser: no padding


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 0), (1, 2)])
def test_ul2_global_batches_do_not_depend_on_ranks_or_workers(c4_path, ul2_tok, world_size, num_workers):
    kw = dict(num_readers=4, shuffle_buffer=16, objective="ul2")
    reference = global_batches(c4_path, ul2_tok, world_size=1, steps=5, **kw)
    assert len(reference) == 5 and all(b["labels"].shape == (GLOBAL, 63) for b in reference)
    got = global_batches(c4_path, ul2_tok, world_size=world_size, num_workers=num_workers, steps=5, **kw)
    assert_same_batches(got, reference)


@pytest.mark.parametrize(("num_workers", "resume_workers"), [(0, 0), (2, 0)])
def test_ul2_resume_gives_the_uninterrupted_stream(c4_path, ul2_tok, num_workers, resume_workers):
    """Blocks of 5 windows of different raw lengths, sub-batches of 2 straddling them: resuming re-reads the
    block and re-draws its denoisers, landing on the same rows."""
    kw = dict(num_readers=4, shuffle_buffer=5, objective="ul2")
    k = 7
    reference = list(itertools.islice(make(c4_path, ul2_tok, num_workers=num_workers, **kw), k + 4))
    first = make(c4_path, ul2_tok, num_workers=num_workers, **kw)
    it = iter(first)
    assert_same_batches([next(it) for _ in range(k)], reference[:k])
    state = json.loads(json.dumps(first.state_dict()))
    del it
    assert state["config"]["objective"] == "ul2" and state["config"]["mixture"] == first.mixture.spec
    resumed = make(c4_path, ul2_tok, num_workers=resume_workers, **kw)
    resumed.load_state_dict(state)
    assert_same_batches(list(itertools.islice(resumed, 4)), reference[k:])


def test_ul2_resume_at_every_step_across_epochs(small_corpus, ul2_tok):
    kw = dict(shuffle_buffer=6, batch_size=4, num_readers=2, objective="ul2")
    loader = make(small_corpus, ul2_tok, **kw)
    stream, states = [], []
    for batch in itertools.islice(loader, 12):
        stream.append(batch)
        states.append(loader.state_dict())
    assert loader.epoch >= 2
    for k in range(0, len(stream) - 2, 3):
        resumed = make(small_corpus, ul2_tok, **kw)
        resumed.load_state_dict(states[k])
        assert_same_batches(list(itertools.islice(resumed, 2)), stream[k + 1:k + 3])


def test_ul2_mode_token_shares_over_batches(c4_path, ul2_tok):
    """Over 2,048 rows of a 4-reader stream the mode tokens [NLU]/[NLG]/[S2S] come in the configured shares
    40% / 40% / 20% (chi-square, 2 degrees of freedom, z < 4.5)."""
    from tests.test_denoisers import MODE_IDS, wilson_hilferty_z

    loader = make(c4_path, ul2_tok, objective="ul2", num_readers=4, batch_size=32, shuffle_buffer=64)
    first = torch.cat([b["input_ids"][:, 0] for b in itertools.islice(loader, 64)])
    counts = np.array([(first == MODE_IDS[k]).sum().item() for k in "RXS"])
    assert counts.sum() == 2048
    expected = 2048 * np.array([0.4, 0.4, 0.2])
    assert wilson_hilferty_z(float(((counts - expected) ** 2 / expected).sum()), 2) < 4.5, counts


def test_ul2_state_and_tokenizer_must_match(c4_path, tok, ul2_tok):
    span_state = make(c4_path, ul2_tok).state_dict()
    ul2 = make(c4_path, ul2_tok, objective="ul2")
    with pytest.raises(ValueError, match="objective was 'span' in the checkpoint, now 'ul2'"):
        ul2.load_state_dict(span_state)
    with pytest.raises(ValueError, match="objective was 'ul2' in the checkpoint, now 'span'"):
        make(c4_path, ul2_tok).load_state_dict(ul2.state_dict())
    with pytest.raises(ValueError, match="mixture was 'R:3:0.15:0.2,"):
        make(c4_path, ul2_tok, objective="ul2", mixture="R:3:0.15:1,S:0.5:1").load_state_dict(ul2.state_dict())
    legacy = {**span_state, "config": {k: v for k, v in span_state["config"].items() if k != "objective"}}
    make(c4_path, ul2_tok).load_state_dict(legacy)  # states saved before objectives existed: span corruption
    with pytest.raises(ValueError, match="has no UL2 mode tokens"):
        make(c4_path, tok, objective="ul2")
    no_modes = make(c4_path, tok, objective="ul2", mode_tokens=False, mixture="R:3:0.15:1,X:8:0.5:1")
    assert next(iter(no_modes))["input_ids"].max() < 32100
    with pytest.raises(ValueError, match="objective 'bert' is not one of span, ul2, prefix_lm"):
        make(c4_path, tok, objective="bert")


def test_inputs_are_exactly_input_length_at_density_half(c4_path, tok):
    """T5's density-0.5 rule shortens the window by one token, which at input_length 19 (mean span 3) leaves
    18 input tokens; the loader keeps the window that fills all 19 (its targets are then 19 + 1 wide)."""
    assert compute_lengths(19, 0.5, 3.0) == (26, 18)  # 26 - 13 noise + 4 spans + EOS = 18 inputs
    loader = make(c4_path, tok, input_length=19, noise_density=0.5, shuffle_buffer=0)
    batch = next(iter(loader))
    assert loader.raw_length == 27 and batch["input_ids"].shape == (8, 19) and batch["labels"].shape == (8, 20)
    assert [len(r) for r in merge(batch["input_ids"], batch["labels"], 32099, 1)] == [27] * 8
