"""Pre-training loader: batches are span-corrupted windows of the packed token stream; ranks x workers
read every document exactly once per epoch; resuming from state_dict() continues the exact stream."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanot5.data import compute_lengths
from nanot5.data.loader import PretrainLoader
from nanot5.data.sources import DataError
from nanot5.data.tokenizer import load_tokenizer

INPUT_LENGTH = 64
RAW, TARGET = compute_lengths(INPUT_LENGTH, 0.15, 3.0)  # raw window and target lengths


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


def test_two_ranks_two_workers_read_every_document_once(c4_path, c4_docs, tok):
    """2 ranks x 2 workers over the C4 sample, one epoch: reader r = rank * 2 + worker packs
    documents r, r+4, ... (the source's round-robin); together the readers' windows are exactly
    the windows of those four document streams, every window once."""
    for rank in range(2):
        loader = make(c4_path, tok, rank=rank, world_size=2, num_workers=2, shuffle_buffer=64, infinite=False,
                      batch_size=16)
        got = Counter(tuple(r) for b in loader for r in merge(b["input_ids"], b["labels"], 32099, 1))
        expected = Counter()
        for worker in range(2):
            expected.update(windows_of(c4_docs[rank * 2 + worker::4], tok, RAW))
        assert got == expected
    # and the four readers' documents partition the corpus
    assert sorted(i for r in range(4) for i in range(r, len(c4_docs), 4)) == list(range(len(c4_docs)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_uninterrupted_stream(c4_path, tok, num_workers):
    # shuffle blocks of 20 windows with batches of 8: batches straddle blocks
    kw = dict(num_workers=num_workers, shuffle_buffer=20)
    k = 7
    it = iter(make(c4_path, tok, **kw))
    reference = [next(it) for _ in range(k + 5)]
    del it
    first = make(c4_path, tok, **kw)
    it = iter(first)
    assert_same_batches([next(it) for _ in range(k)], reference[:k])
    state = first.state_dict()
    del it
    resumed = make(c4_path, tok, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states survive JSON (and torch.save)
    it = iter(resumed)
    assert_same_batches([next(it) for _ in range(5)], reference[k:])
    # a second resume from the resumed loader's state continues the same stream
    again = make(c4_path, tok, **kw)
    again.load_state_dict(resumed.state_dict())
    assert_same_batches([next(iter(again))], [next(it)])


def test_resume_at_every_step_across_epochs(small_corpus, tok):
    kw = dict(shuffle_buffer=6, batch_size=4)
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
