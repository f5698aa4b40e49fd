"""Fine-tuning on any seq2seq data: records from jsonl/json/csv/tsv/parquet/hf: -> (input, references), templates,
validation splits, bad records, truncation counts.

Oracles: the records the test writes (every format holds the same rows), Python's own csv/json writers and
pyarrow for the files, the `datasets` library reading the same files for `hf:`, and the T5 tokenizer through
`transformers` (truncation=True) for token ids.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter

import pytest

from nanot5.config import load_config
from nanot5.data.batching import encode_examples, truncation_message
from nanot5.data.finetune import finetune_sets, prediction_records
from nanot5.data.seq2seq import (
    RecordFormatter,
    load_records,
    load_seq2seq_splits,
    template_columns,
)
from nanot5.errors import ConfigError, DataError

ROWS = [
    {"id": "a1", "document": "The cat sat on the mat, all day.", "summary": "cat sits", "label": 1},
    {"id": "a2", "document": "Stocks fell sharply on Monday.", "summary": "stocks fall", "label": 0},
    {"id": "a3", "document": 'A "quoted" text,\twith tab and comma', "summary": "quotes", "label": 1},
    {"id": "a4", "document": "Line one\nline two", "summary": "two lines", "label": 0},
    {"id": "a5", "document": "Ünïcödé façade naïve", "summary": "unicode", "label": 1},
]


def write(path, rows, fmt=None):
    fmt = fmt or "".join(path.suffixes)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in (".jsonl", ".jsonl.gz"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
    elif fmt == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False))
    elif fmt in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def fmt_(**kw):
    kw.setdefault("input_column", "document")
    kw.setdefault("target_column", "summary")
    return RecordFormatter(**kw)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".csv", ".tsv", ".parquet"])
def test_every_format_gives_the_same_examples(tmp_path, suffix):
    path = write(tmp_path / f"data{suffix}", ROWS)
    recs = load_records(str(path), formatter=fmt_())
    assert [r["input"] for r in recs] == [r["document"] for r in ROWS]
    assert [r["references"] for r in recs] == [[r["summary"]] for r in ROWS]
    assert [r["id"] for r in recs] == [r["id"] for r in ROWS]
    # labels: ints in json/parquet, strings in csv; both become the text "1"/"0"
    recs = load_records(str(path), formatter=fmt_(template="summarize: {document}", target_column="label"))
    assert recs[1]["input"] == "summarize: Stocks fell sharply on Monday."
    assert [r["references"] for r in recs] == [[str(r["label"])] for r in ROWS]


def test_templates_lists_and_nested_columns(tmp_path):
    rows = [{"question": "Who?", "context": "Bob did.", "answers": {"text": ["Bob", "bob"]}, "n": 3},
            {"question": "Where?", "context": "In Rome.", "answers": {"text": ["Rome"]}, "n": 4}]
    path = write(tmp_path / "qa.jsonl", rows)
    f = fmt_(template="question: {question} context: {context}", target_template="{answers[text][0]} ({n})")
    recs = load_records(str(path), formatter=f)
    assert recs[0]["input"] == "question: Who? context: Bob did." and recs[0]["references"] == ["Bob (3)"]
    assert recs[1]["id"] == "1"  # no id column: the record's number
    with pytest.raises(DataError, match=r"qa\.jsonl: line 1: column 'answers' is a dict, not a string"):
        load_records(str(path), formatter=RecordFormatter(template="{question}", target_column="answers"))
    # a list target is a list of acceptable references
    rows2 = [{"input": "x", "target": ["y1", "y2"]}, {"input": "z", "target": "w"}]
    recs = load_records(str(write(tmp_path / "multi.jsonl", rows2)), formatter=RecordFormatter())
    assert [r["references"] for r in recs] == [["y1", "y2"], ["w"]]
    assert template_columns("{a} {b[c]} {a.d} {{literal}}") == ["a", "b"]


def test_config_mistakes_name_the_key_and_the_columns(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"d\.jsonl: line 1: no column 'input' \(data\.input_column\), but the "
                                         r"data has columns \['id', 'document', 'summary', 'label'\]"):
        load_records(str(path), formatter=RecordFormatter())
    with pytest.raises(DataError, match=r"no column 'target' \(data\.target_column\).*'document', 'summary'"):
        load_records(str(path), formatter=RecordFormatter(input_column="document"))
    with pytest.raises(DataError, match=r"line 1: data\.template 'summarize: \{text\}' names column 'text', but "
                                         r"the data has columns \['id', 'document', 'summary', 'label'\]"):
        load_records(str(path), formatter=fmt_(template="summarize: {text}"))
    with pytest.raises(DataError, match=r"data\.target_template '\{answer\}' names column 'answer'"):
        load_records(str(path), formatter=fmt_(target_template="{answer}"))
    # the check is not a bad record: on_error=skip does not hide it
    csv_path = write(tmp_path / "d.csv", ROWS)
    with pytest.raises(DataError, match=r"d\.csv: line 2: data\.template.*'text'.*\['id', 'document'"):
        load_records(str(csv_path), formatter=fmt_(template="{text}"), on_error="skip")
    for bad, msg in [("x {}", "positional"), ("x {a", "not a valid template"), ("plain", "names no column")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(["mode=ft", f"data.template={bad}"])
    # the CLI's key=value keeps a template's text even where YAML would read a mapping
    assert load_config(["data.template=summarize: {document}"]).data.template == "summarize: {document}"


def test_bad_records_name_file_and_line_or_are_counted(tmp_path):
    good = [json.dumps(r) for r in ROWS[:2]]
    lines = [good[0], "{not json", json.dumps({"document": "no summary"}), json.dumps({"document": "n",
             "summary": None}), json.dumps({"document": "e", "summary": []}), "[1, 2]", "", good[1]]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: malformed JSON.*data\.on_error=skip"):
        load_records(str(path), formatter=fmt_())
    skipped = Counter()
    recs = load_records(str(path), formatter=fmt_(), on_error="skip", skipped=skipped)
    assert [r["input"] for r in recs] == [ROWS[0]["document"], ROWS[1]["document"]]
    assert recs[1]["loc"].endswith("bad.jsonl: line 8")
    assert skipped == Counter(malformed_json=1, missing_column=1, null_value=1, empty_target=1, not_a_record=1)
    path.write_text("\n".join([good[0], good[1], json.dumps({"document": "d"})]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: no column 'summary' \(data\.target_column\)"):
        load_records(str(path), formatter=fmt_())
    # CSV: a row with the wrong number of fields
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("document,summary\nfine,ok\nonly one field\nalso,fine\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 3: 1 fields where the header"):
        load_records(str(bad_csv), formatter=fmt_())
    recs = load_records(str(bad_csv), formatter=fmt_(), on_error="skip")
    assert [r["input"] for r in recs] == ["fine", "also"]
    long = write(tmp_path / "long.csv", [{"document": "word " * 60_000, "summary": "long"}])  # 300 KB field
    assert len(load_records(str(long), formatter=fmt_())[0]["input"]) == 300_000
    with pytest.raises(DataError, match="no such file or directory.*'sni'"):
        load_records(str(tmp_path / "nothing.jsonl"), formatter=fmt_())


def test_validation_fraction_source_and_default_split(tmp_path):
    rows = [{"input": f"in {i}", "target": f"out {i}"} for i in range(40)]
    path = str(write(tmp_path / "all.jsonl", rows))
    a = load_seq2seq_splits(path, validation_fraction=0.25, seed=3)
    b = load_seq2seq_splits(path, validation_fraction=0.25, seed=3)
    c = load_seq2seq_splits(path, validation_fraction=0.25, seed=4)
    assert len(a.validation) == 10 and len(a.train) == 30
    assert a.validation == b.validation and a.validation != c.validation
    assert sorted(r["input"] for r in a.train + a.validation) == sorted(r["input"] for r in rows)
    assert [int(r["id"]) for r in a.train] == sorted(int(r["id"]) for r in a.train)  # file order kept
    assert "10 of 40 training records held out" in a.report["validation_source"]
    with pytest.raises(DataError, match=r"validation_fraction=0\.01 of 40 training records holds out 0: the "
                                         r"validation split would be empty"):
        load_seq2seq_splits(path, validation_fraction=0.01)
    assert load_seq2seq_splits(path).validation is None  # one file: no validation split of its own

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"the validation split \(.*empty\.jsonl\) has no usable records"):
        load_seq2seq_splits(path, validation_source=str(empty))
    with pytest.raises(DataError, match=r"no usable training records"):
        load_seq2seq_splits(str(empty))
    with pytest.raises(ConfigError, match="not both"):
        load_seq2seq_splits(path, validation_source=path, validation_fraction=0.1)

    folder = tmp_path / "folder"
    write(folder / "train.jsonl", rows[:30])
    write(folder / "validation.jsonl", rows[30:])
    s = load_seq2seq_splits(str(folder))
    assert [r["input"] for r in s.validation] == [r["input"] for r in rows[30:]]
    assert [r["input"] for r in s.train] == [r["input"] for r in rows[:30]]
    s = load_seq2seq_splits(str(folder / "train.jsonl"), validation_source=str(folder / "validation.jsonl"))
    assert len(s.validation) == 10


def test_hf_source_through_datasets_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"document": f"doc {i}", "summary": f"sum {i}"} for i in range(12)]
    write(tmp_path / "train.jsonl", rows[:8])
    write(tmp_path / "validation.jsonl", rows[8:])
    f = fmt_(template="summarize: {document}")
    recs = load_records(f"hf:{tmp_path}", formatter=f)
    assert [r["input"] for r in recs] == [f"summarize: doc {i}" for i in range(8)]
    assert recs[0]["loc"] == f"hf:{tmp_path}:train: example 0"
    assert [r["references"] for r in load_records(f"hf:{tmp_path}::validation", formatter=f)] == \
        [[f"sum {i}"] for i in range(8, 12)]
    s = load_seq2seq_splits(f"hf:{tmp_path}", input_column="document", target_column="summary")
    assert len(s.train) == 8 and [r["input"] for r in s.validation] == [f"doc {i}" for i in range(8, 12)]
    with pytest.raises(DataError, match=r"no column 'input' \(data\.input_column\).*\['document', 'summary'\]"):
        load_records(f"hf:{tmp_path}", formatter=RecordFormatter())


def test_truncation_is_counted_and_matches_hf(tmp_path, t5_tokenizer_dir):
    from transformers import AutoTokenizer

    from nanot5.data.tokenizer import load_tokenizer

    tok = load_tokenizer(t5_tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    inputs = [r["document"] for r in ROWS]
    refs = [[r["summary"]] for r in ROWS]
    refs[0] = ["cat sits", "a cat sits on a mat all day long"]
    ex = encode_examples(tok, inputs, refs, max_seq_len=8, max_target_len=4, seed=0)
    for i, text in enumerate(inputs):
        assert ex.inputs[i].tolist() == hf(text, max_length=8, truncation=True)["input_ids"]
        for j, ref in enumerate(refs[i]):
            assert ex.references[i][j].tolist() == hf(ref, max_length=4, truncation=True)["input_ids"]
    full_in = [len(hf(t)["input_ids"]) for t in inputs]
    full_ref = [len(hf(r)["input_ids"]) for rs in refs for r in rs]
    assert ex.stats == {"examples": 5, "inputs_truncated": sum(n > 8 for n in full_in),
                        "targets_truncated": sum(n > 4 for n in full_ref),
                        "max_input_tokens": max(full_in), "max_target_tokens": max(full_ref)}
    assert ex.stats["inputs_truncated"] >= 3 and ex.stats["targets_truncated"] >= 1
    msg = truncation_message(ex.stats, max_seq_len=8, max_target_len=4, what="train")
    assert f"{ex.stats['targets_truncated']} targets cut to data.max_target_len=4" in msg
    assert "of 5 inputs cut to data.max_seq_len=8" in msg


def test_finetune_sets_from_a_config(tmp_path, t5_tokenizer_dir):
    from nanot5.data.tokenizer import load_tokenizer

    tok = load_tokenizer(t5_tokenizer_dir)
    rows = [{"src": f"translate: {'word ' * (i % 7)}{i}", "tgt": [f"out {i}", f"alt {i}"]} for i in range(30)]
    path = write(tmp_path / "d.jsonl", rows)
    cfg = load_config(["mode=ft", f"data.source={path}", "data.input_column=src", "data.target_column=tgt",
                       "data.validation_fraction=0.2", "data.max_seq_len=6", "data.max_target_len=16"])
    sets = finetune_sets(cfg, tok)
    assert not sets.sni and len(sets.train) == 24 and len(sets.validation) == 6
    assert [r["references"] for r in sets.validation_records] == \
        [rows[int(r["id"])]["tgt"] for r in sets.validation_records]
    lines = "\n".join(sets.describe())
    assert "train: 24 examples from" in lines and "6 of 30 training records held out" in lines
    assert "inputs cut to data.max_seq_len=6" in lines
    assert prediction_records(cfg, tok) == sets.validation_records
    # predicting a file without a validation split: every record
    cfg = load_config(["mode=ft", f"data.source={path}", "data.input_column=src", "data.target_column=tgt"])
    assert [r["input"] for r in prediction_records(cfg, tok)] == [r["src"] for r in rows]
