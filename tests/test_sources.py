"""Text sources: every local format parses, sharding reads each document exactly once, positions
resume, and bad input names the file and line."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from nanot5.data.sources import DataError, HFSource, LocalSource, open_source

DOCS = ["First document.\nIt has two lines.", "Zweites Dokument — ünïcödé ✓", "third", "  ", "fourth one"]
EXPECTED = [d for d in DOCS if d.strip()]  # whitespace documents are skipped silently


@pytest.fixture(scope="module")
def c4_docs(c4_dir: Path) -> list[str]:
    with gzip.open(c4_dir / "c4-train.sample.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _jsonl_bytes(docs, key="text") -> bytes:
    return "".join(json.dumps({key: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def _write_all_formats(tmp: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    data = _jsonl_bytes(DOCS)
    files = {"jsonl": tmp / "a.jsonl", "jsonl.gz": tmp / "a.jsonl.gz", "jsonl.zst": tmp / "a.jsonl.zst",
             "json array": tmp / "b.json", "json lines (C4 naming)": tmp / "c4-x.json.gz"}
    files["jsonl"].write_bytes(data)
    files["jsonl.gz"].write_bytes(gzip.compress(data))
    files["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(data))
    files["json array"].write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    files["json lines (C4 naming)"].write_bytes(gzip.compress(data))
    files["txt"] = tmp / "a.txt"
    files["txt"].write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    files["parquet"] = tmp / "a.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), files["parquet"], row_group_size=2)
    return files


def test_each_local_format_parses(tmp_path):
    for fmt, path in _write_all_formats(tmp_path).items():
        got = list(open_source(str(path)))
        # paragraph mode joins a block's lines with "\n", which is how DOCS[0] was written
        assert got == EXPECTED, fmt


def test_txt_line_mode_and_crlf(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\n  \r\nthree\n")
    assert list(open_source(str(path), txt_mode="line")) == ["one", "two", "three"]
    assert list(open_source(str(path))) == ["one\ntwo", "three"]


def test_text_column_and_bare_strings(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(_jsonl_bytes(["x y", "z"], key="content"))
    assert list(open_source(str(tmp_path / "c.jsonl"), text_column="content")) == ["x y", "z"]
    (tmp_path / "s.json").write_text(json.dumps(["plain", "strings"]))
    assert list(open_source(str(tmp_path / "s.json"))) == ["plain", "strings"]


def test_directory_glob_and_split_names(tmp_path):
    for name, docs in [("train-00000.jsonl", ["t0", "t1"]), ("train-00001.jsonl.gz", ["t2"]),
                       ("validation-00000.jsonl", ["v0"])]:
        data = _jsonl_bytes(docs)
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert list(open_source(str(tmp_path))) == ["t0", "t1", "t2"]
    assert list(open_source(str(tmp_path), split="validation")) == ["v0"]
    with pytest.raises(DataError, match="no files for split 'test'"):
        open_source(str(tmp_path), split="test")
    assert list(open_source(str(tmp_path / "*.jsonl"))) == ["t0", "t1", "v0"]  # a glob takes what it matches


def _split_c4(tmp: Path, docs: list[str], sizes: list[int]) -> list[Path]:
    paths, i = [], 0
    for k, n in enumerate(sizes):
        path = tmp / (f"part-{k}.jsonl" + (".gz" if k % 2 else ""))
        data = _jsonl_bytes(docs[i:i + n])
        path.write_bytes(gzip.compress(data) if k % 2 else data)
        paths.append(path)
        i += n
    return paths


def test_sharding_reads_every_c4_document_exactly_once(c4_dir, c4_docs):
    """2 ranks x 2 workers = 4 readers: reader r = rank * 2 + worker gets documents r, r+4, r+8, ..."""
    source = open_source(str(c4_dir / "c4-train.sample.jsonl.gz"))
    seen = Counter()
    for rank in range(2):
        for worker in range(2):
            r = rank * 2 + worker
            got = [text for _, text in source.documents(r, 4)]
            assert got == c4_docs[r::4]
            seen.update(got)
    assert sum(seen.values()) == len(c4_docs) == 1000 and set(seen) == set(c4_docs)


def test_sharding_across_uneven_files(tmp_path, c4_docs):
    docs = c4_docs[:103]
    paths = _split_c4(tmp_path, docs, [40, 1, 0, 62])
    paths[2].write_bytes(b"\n\n")  # blank lines only: an empty file
    source = LocalSource(paths, on_error="skip")
    per_reader = [[t for _, t in source.documents(r, 3)] for r in range(3)]
    # record numbering runs across files, so round-robin continues over file boundaries
    assert per_reader == [docs[r::3] for r in range(3)]
    assert source.skipped == {"empty_file": 1}  # counted once, not once per reader


def test_positions_resume_exactly(tmp_path, c4_docs):
    docs = c4_docs[:60]
    source = LocalSource(_split_c4(tmp_path, docs, [25, 35]))
    for reader in range(2):
        full = list(source.documents(reader, 2))
        for k in (0, 1, 12, 13, len(full) - 1):
            assert list(source.documents(reader, 2, start=full[k][0])) == full[k:]
        # positions survive a JSON round trip (checkpoints may store lists)
        pos = json.loads(json.dumps(full[20][0]))
        assert [t for _, t in source.documents(reader, 2, start=pos)] == [t for _, t in full[20:]]


def test_bad_input_errors_name_file_and_line(tmp_path):
    cases = {
        "malformed.jsonl": (b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', "line 3: malformed JSON"),
        "nokey.jsonl": (b'{"text": "ok"}\n{"body": "no text here"}\n', "line 2: no 'text' key"),
        "notstr.jsonl": (b'{"text": 5}\n', "line 1: 'text' is int"),
        "utf8.jsonl": (b'{"text": "ok"}\n\n{"text": "bad \xff byte"}\n', "line 3: invalid UTF-8"),
        "utf8.txt": (b"fine\nstill fine\n\nbad \xc3\x28 here\n", "line 4: invalid UTF-8"),
        "array.json": (b'[{"text": "a"},\n {"text": "b"},\n {"text": ]', "line 3: malformed JSON"),
        "empty.jsonl": (b"", "empty file"),
        "truncated.jsonl.gz": (gzip.compress(_jsonl_bytes(DOCS * 50))[:-30], "cannot read file"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as err:
            list(open_source(str(path)))
        assert str(path) in str(err.value) and message in str(err.value), (name, str(err.value))


def test_missing_paths_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no files match"):
        open_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        open_source(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="no data files"):
        open_source(str(tmp_path))
    path = tmp_path / "t.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text'"):
        list(open_source(str(path)))


def test_on_error_skip_counts_and_keeps_good_records(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{"text": nope}\n{"body": "x"}\n{"text": "bad \xff"}\n'
                     b'{"text": "   "}\n{"text": "good two"}\n')
    (tmp_path / "empty.txt").write_bytes(b"")
    source = open_source(str(tmp_path), on_error="skip")
    with caplog.at_level("WARNING", logger="nanot5.data"):
        assert list(source) == ["good one", "good two"]
    assert source.skipped == {"malformed_json": 1, "missing_column": 1, "invalid_utf8": 1, "empty_file": 1}
    assert sum("skipping bad input" in r.message for r in caplog.records) == 1  # warned once


def test_demo_and_hub_specs_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOT5_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="nanot5 data prepare demo"):
        open_source("demo")
    demo = tmp_path / "corpora" / "demo"
    demo.mkdir(parents=True)
    (demo / "train-00000.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(["d0", "d1"])))
    (demo / "validation-00000.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(["v0"])))
    assert list(open_source("demo")) == ["d0", "d1"]
    assert list(open_source("demo", split="validation")) == ["v0"]
    # hub specs only parse here; nothing is fetched until documents() runs
    c4 = open_source("c4", split="validation")
    assert isinstance(c4, HFSource) and (c4.path, c4.config, c4.split) == ("allenai/c4", "en", "validation")
    hf = open_source("hf:user/data::test", text_column="body")
    assert (hf.path, hf.config, hf.split, hf.text_column) == ("user/data", None, "test", "body")
    with pytest.raises(DataError, match="expected hf:NAME"):
        open_source("hf:")


def test_hf_source_on_local_files_shards_and_resumes(tmp_path, monkeypatch, c4_docs):
    """`hf:` through the real `datasets` library, offline, on a local folder of 4 jsonl shards."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets")
    docs = c4_docs[:40]
    for k in range(4):
        (tmp_path / f"train-{k:05d}.jsonl").write_bytes(_jsonl_bytes(docs[k * 10:(k + 1) * 10]))
    source = open_source(f"hf:{tmp_path}")
    assert list(source) == docs
    for num_readers in (2, 3):  # 2 divides the 4 files (file sharding), 3 does not (every 3rd example)
        seen = Counter()
        for r in range(num_readers):
            full = list(source.documents(r, num_readers))
            seen.update(t for _, t in full)
            for k in (1, 5):  # dataset states are not canonical: compare the documents
                resumed = list(source.documents(r, num_readers, start=full[k][0]))
                assert [t for _, t in resumed] == [t for _, t in full[k:]]
                assert [t for _, t in source.documents(r, num_readers, start=resumed[2][0])] == \
                    [t for _, t in full[k + 2:]]  # a position taken after a resume resumes too
        assert seen == Counter(docs)


# ----------------------------------------------------------------------------- the demo corpus

RST = """.. SPDX-License-Identifier: GPL-2.0
.. _intro:

======================
The Title of the Page
======================

:Author: Somebody <someone@example.com>

This first paragraph explains what the :mod:`os` module and its
:func:`~os.path.join` helper do, with ``literal text`` and *emphasis*, see
`the docs <https://docs.python.org/>`_ for more [#]_.

Section
-------

Here is an example of how the :class:`Thing` is used in practice::

    thing = Thing()
    thing.run()

.. code-block:: python

   print("this is code and is dropped entirely")

.. note::

   A note body is prose and it should be kept as a paragraph of its own.

.. note:: An inline note also counts as prose that is worth keeping here.

.. function:: frobnicate(x, y)

   Return the frobnication of *x* and *y*, which is a perfectly normal thing.

   :param x: the first value

>>> frobnicate(1, 2)
3

+-------+-------+
| a     | b     |
+-------+-------+

* The first bullet item is a sentence with more than eight words in it.
* Short item.

-> ==> <== ### %%% &&& *** @@@ !!! ||| ---> <--- ~~~ ^^^ ===
"""


def test_rst_to_clean_paragraphs():
    from nanot5.data.demo import documents_of, rst_paragraphs

    paragraphs = rst_paragraphs(RST)
    assert paragraphs == [
        "This first paragraph explains what the os module and its join helper do, with literal text and "
        "emphasis, see the docs for more.",
        "Here is an example of how the Thing is used in practice:",
        "A note body is prose and it should be kept as a paragraph of its own.",
        "An inline note also counts as prose that is worth keeping here.",
        "Return the frobnication of x and y, which is a perfectly normal thing.",
        "The first bullet item is a sentence with more than eight words in it.",
    ]
    docs = documents_of(paragraphs, max_chars=150)
    assert "\n".join(docs) == "\n".join(paragraphs) and all(len(d) <= 150 for d in docs) and len(docs) == 4


def test_prepare_demo_without_apt_names_the_alternatives(tmp_path, monkeypatch):
    import nanot5.data.demo as demo

    monkeypatch.setattr(demo.shutil, "which", lambda tool: None)
    with pytest.raises(DataError) as err:
        demo.prepare_demo(tmp_path / "demo")
    message = str(err.value)
    assert "apt-get" in message and "data.source=c4" in message and "hf:NAME" in message and ".jsonl" in message
    with pytest.raises(DataError, match="apt-get"):
        demo.data_prepare_main(["demo", f"out={tmp_path / 'demo'}"])


@pytest.mark.slow
def test_prepare_demo_from_debian_packages(tmp_path, monkeypatch):
    """Downloads python3-doc and linux-doc (~50 MB) from the Debian archive and builds the corpus."""
    import shutil

    import nanot5.data.demo as demo

    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("apt-get/dpkg not available (not a Debian-like system)")
    monkeypatch.setenv("NANOT5_CACHE", str(tmp_path))
    try:
        out = demo.prepare_demo()
    except DataError as e:
        if str(e).startswith(("apt-get download", "apt-get update")):
            pytest.skip(f"the Debian archive is unreachable: {e}")
        raise
    assert out == tmp_path / "corpora" / "demo"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chars"]["train"] >= 15_000_000
    n_train, n_val = meta["documents"]["train"], meta["documents"]["validation"]
    assert 0.015 <= n_val / (n_train + n_val) <= 0.025
    train, val = list(open_source("demo")), list(open_source("demo", split="validation"))
    assert (len(train), len(val)) == (n_train, n_val)
    assert not set(train) & set(val)  # held out by document
    paragraphs = [p for d in train for p in d.split("\n")]
    assert len(set(paragraphs)) == len(paragraphs)  # de-duplicated
    # markup survives only in the odd malformed source paragraph
    for marker in (":func:`", ":class:`", ":ref:`", "``", "http://", ".. code-block", ".. note::"):
        assert sum(marker in p for p in paragraphs) <= 1e-3 * len(paragraphs), marker
    assert demo.prepare_demo() == out  # cached: nothing is rebuilt
    # the demo preset's tokenizer: 8000 pieces + 100 sentinels, trained on the train split
    from nanot5.data.tokenizer import load_tokenizer

    tok = load_tokenizer(demo.demo_tokenizer())
    assert (tok.vocab_size, tok.sentinel_id(0), tok.eos_id) == (8100, 8099, 1)
    text = "The kernel schedules threads on the available CPUs."
    assert tok.decode(tok.encode(text)) == text
