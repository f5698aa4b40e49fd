"""Tokenizers: the real T5 vocabulary gives transformers' ids; a trained tokenizer follows T5's
conventions, round-trips its training text and loads in transformers.AutoTokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from nanot5.data.tokenizer import load_tokenizer, tokenizer_main, train_tokenizer


@pytest.fixture(scope="module")
def c4_texts(c4_dir: Path) -> list[str]:
    with gzip.open(c4_dir / "c4-train.sample.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def t5(t5_tokenizer_dir):
    return load_tokenizer(t5_tokenizer_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, c4_texts):
    """A small tokenizer trained on the first 300 C4 documents (full character coverage)."""
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(c4_texts[:300], 2000, out, character_coverage=1.0), out, c4_texts[:300]


def test_t5_hello_world(t5):
    assert t5.encode("Hello world") == [8774, 296, 1]  # EOS appended, as tokenizer(x).input_ids does
    assert t5.encode("Hello world", add_eos=False) == [8774, 296]
    assert t5.encode_batch(["Hello world", "The quick brown fox"]) == [[8774, 296], [37, 1704, 4216, 3, 20400]]
    assert (t5.pad_id, t5.eos_id, t5.unk_id, t5.vocab_size) == (0, 1, 2, 32100)
    assert [t5.sentinel_id(k) for k in (0, 1, 99)] == [32099, 32098, 32000]
    assert t5.num_sentinels == 100
    with pytest.raises(ValueError, match="100 sentinels"):
        t5.sentinel_id(100)


def test_t5_ids_equal_transformers(t5, t5_tokenizer_dir, c4_texts):
    hf = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    texts = c4_texts[:40] + ["  leading and  double  spaces ", "ünïcödé — “quotes” ﬁ", "<extra_id_0> x", ""]
    assert t5.encode_batch(texts) == [hf(t).input_ids[:-1] for t in texts]
    ids = t5.encode(c4_texts[0])
    assert t5.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert t5.sentinel_id(0) == hf.convert_tokens_to_ids("<extra_id_0>")


def test_load_from_spiece_model_file_and_save(t5, t5_tokenizer_dir, tmp_path, c4_texts):
    from_model = load_tokenizer(t5_tokenizer_dir / "spiece.model")
    assert from_model.encode("Hello world") == [8774, 296, 1]
    assert from_model.encode_batch(c4_texts[:10]) == t5.encode_batch(c4_texts[:10])
    assert from_model.sentinel_id(0) == 32099 and from_model.vocab_size == 32100
    t5.save(tmp_path / "saved")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf("Hello world").input_ids == [8774, 296, 1] and len(hf) == 32100


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(ValueError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_trained_tokenizer_t5_conventions(trained):
    tok, out, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    assert sp.get_piece_size() == 2000
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.num_sentinels == 100 and tok.vocab_size == 2100
    # sentinels sit above the pieces, <extra_id_0> highest
    assert [tok.sentinel_id(k) for k in range(100)] == list(range(2099, 1999, -1))


def test_trained_tokenizer_round_trips_and_matches_sentencepiece(trained):
    tok, out, texts = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    normalizer = spm.SentencePieceNormalizer(model_file=str(out / "spiece.model"))
    ids = tok.encode_batch(texts)
    assert ids == [sp.encode(t) for t in texts]  # the SentencePiece model itself is the oracle
    for text, row in zip(texts, ids, strict=True):
        # the normalizer writes spaces as "▁" and adds the dummy-prefix "▁"
        assert tok.decode(row) == normalizer.normalize(text).replace("▁", " ").strip()
        assert 2 not in row  # full coverage: no <unk> in the training text


def test_trained_tokenizer_loads_in_autotokenizer(trained):
    tok, out, texts = trained
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == 2100 and (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert [hf.convert_tokens_to_ids(f"<extra_id_{k}>") for k in (0, 99)] == [2099, 2000]
    assert [hf(t).input_ids for t in texts[:50]] == [tok.encode(t) for t in texts[:50]]
    assert load_tokenizer(out).encode_batch(texts[:5]) == tok.encode_batch(texts[:5])


def test_tokenizer_train_cli(c4_dir, tmp_path, capsys):
    out = tmp_path / "cli-tok"
    rc = tokenizer_main(["train", "--source", str(c4_dir / "c4-train.sample.jsonl.gz"), "--vocab-size", "600",
                         "--out", str(out), "--max-docs", "120"])
    assert rc == 0 and "trained on 120 documents" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 700 and tok.sentinel_id(0) == 699 and tok.encode("hello")[-1] == 1
