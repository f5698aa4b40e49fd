"""Text sources: C4, any HF dataset, local jsonl/json/txt/parquet files, the offline demo corpus.

A source yields documents (str) in a fixed order and splits them between *readers*: the loader's
logical readers j = 0..R-1 (see loader.py), which it spreads over ranks and DataLoader workers.
Every document goes to exactly one reader per epoch.

Each yielded document comes with a small *position* (plain ints/dicts) such that
`documents(..., start=position)` yields that same document first. The loader stores positions,
never text, in its checkpoint state.

Local files: records (lines, paragraphs, array elements, rows) are numbered in file order across all
files, and record g goes to reader g % num_readers. A reader skips foreign records without parsing
them, so skipping costs little more than decompression. HF streaming datasets are split with
`datasets.distributed.split_dataset_by_node` (by file shards when they divide evenly, else every
num_readers-th example) and resume through the dataset's own `state_dict`.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanot5.errors import DataError

log = logging.getLogger("nanot5.data")

FORMATS = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSIONS = (".gz", ".zst", ".zstd")
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}
HUB_SOURCES = {"c4": ("allenai/c4", "en")}


def cache_root() -> Path:
    """Root of nanot5's cache: $NANOT5_CACHE, else ~/.cache/nanot5."""
    return Path(os.environ.get("NANOT5_CACHE") or Path.home() / ".cache" / "nanot5")


def demo_dir() -> Path:
    """Folder of the offline demo corpus built by `nanot5 data prepare demo`."""
    return cache_root() / "corpora" / "demo"


def file_format(path: str | Path, formats: tuple[str, ...] = FORMATS) -> tuple[str, str]:
    """(format, compression) of a file from its name, e.g. 'a.jsonl.zst' -> ('.jsonl', '.zst');
    format is "" when the name ends in none of `formats`."""
    name = str(path).lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    base = name[: len(name) - len(comp)]
    fmt = next((f for f in formats if base.endswith(f)), "")
    return fmt, comp


class Source:
    """A deterministic, shardable stream of documents. Subclasses implement `documents`."""

    name: str = "source"

    def __init__(self, *, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: Counter[str] = Counter()  # bad records skipped (on_error='skip'), by kind
        self._warned = False

    def documents(
        self, reader_id: int = 0, num_readers: int = 1, *, start: Any = None
    ) -> Iterator[tuple[Any, str]]:
        """Yield (position, text) for this reader's share of one epoch, from `start` (a position) on."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        """All documents of one epoch, in order (a single reader)."""
        for _, text in self.documents():
            yield text

    def describe(self) -> dict:
        """Small summary stored with loader state to catch a changed source on resume."""
        return {"name": self.name}

    def summary(self) -> str:
        """One line for the user: what is read (printed at the start of a run)."""
        return self.name

    def _bad(self, kind: str, message: str) -> None:
        """Raise a DataError, or count and skip the record when on_error='skip' (warn once)."""
        if self.on_error == "raise":
            raise DataError(message + " (set data.on_error=skip to skip bad records)")
        self.skipped[kind] += 1
        if not self._warned:
            self._warned = True
            log.warning("skipping bad input: %s; further bad records are counted silently", message)

    def log_skipped(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d bad records so far: %s", self.name, sum(self.skipped.values()),
                        dict(self.skipped))


# ----------------------------------------------------------------------------- local files


def _open_binary(path: Path, comp: str) -> io.BufferedIOBase:
    if comp == ".gz":
        return io.BufferedReader(gzip.GzipFile(path, "rb"), buffer_size=1 << 20)
    if comp in (".zst", ".zstd"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


class LocalSource(Source):
    """Documents from local .jsonl/.json/.txt/.parquet files (optionally .gz/.zst compressed).

    Record numbering (the sharding unit): jsonl = non-blank lines; json = array elements (a .json file
    that is not an array is read as JSON Lines, like C4's own `c4-*.json.gz`); txt = paragraphs
    separated by blank lines (txt_mode='paragraph') or lines (txt_mode='line'); parquet = rows.
    """

    def __init__(self, files: list[Path], *, name: str | None = None, text_column: str = "text",
                 txt_mode: str = "paragraph", on_error: str = "raise"):
        super().__init__(on_error=on_error)
        if txt_mode not in ("paragraph", "line"):
            raise ValueError(f"txt_mode must be 'paragraph' or 'line', got {txt_mode!r}")
        if not files:
            raise DataError(f"{name}: no input files")
        self.files = [Path(f) for f in files]
        self.name = name or str(self.files[0])
        self.text_column = text_column
        self.txt_mode = txt_mode

    def describe(self) -> dict:
        return {"name": self.name, "num_files": len(self.files)}

    def summary(self) -> str:
        size = sum(f.stat().st_size for f in self.files)
        shown = ", ".join(str(f) for f in self.files[:3]) + (f", ... ({len(self.files) - 3} more)"
                                                             if len(self.files) > 3 else "")
        return f"{len(self.files)} file{'s' if len(self.files) > 1 else ''} ({size / 1e6:.1f} MB): {shown}"

    def documents(self, reader_id: int = 0, num_readers: int = 1, *, start: Any = None
                  ) -> Iterator[tuple[Any, str]]:
        if not 0 <= reader_id < num_readers:
            raise ValueError(f"reader_id {reader_id} not in [0, {num_readers})")
        # position = (file index, record index in file, global record index)
        f0, r0, g = (0, 0, 0) if start is None else (int(x) for x in start)
        for fi in range(f0, len(self.files)):
            first = r0 if fi == f0 else 0
            n = 0  # records seen in this file
            for ri, loc, raw in self._records(self.files[fi], first):
                n = ri + 1
                if (g + ri - first) % num_readers != reader_id:
                    continue  # another reader's record: not even parsed
                text = self._decode(self.files[fi], loc, raw)
                if text is not None and text.strip():
                    yield (fi, ri, g + ri - first), text
            if n == 0 and first == 0:
                if self.on_error == "raise" or fi % num_readers == reader_id:  # count it once
                    self._bad("empty_file", f"{self.files[fi]}: empty file (no records)")
            g += n - first

    # Each _records_* yields (record index, location for messages, raw record) from record `first` on.
    # raw is a JSON line's bytes, or (kind, value) with kind 'txt' (lines as bytes), 'json' (a parsed
    # array element) or 'parquet' (a cell); bytes stay undecoded so foreign records cost nothing.
    def _records(self, path: Path, first: int) -> Iterator[tuple[int, str, Any]]:
        fmt, comp = file_format(path)
        try:
            if fmt == ".parquet":
                yield from self._records_parquet(path, first)
                return
            with _open_binary(path, comp) as fh:
                if fmt == ".json":
                    head = fh.peek(64).lstrip()[:1] if hasattr(fh, "peek") else b""
                    if head == b"[":
                        yield from self._records_json_array(path, fh, first)
                        return
                if fmt == ".txt":
                    yield from self._records_txt(fh, first)
                else:
                    yield from self._records_jsonl(fh, first)
        except (OSError, EOFError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            # truncated gzip, corrupt zstd/parquet, unreadable file
            self._bad("unreadable_file", f"{path}: cannot read file: {type(e).__name__}: {e}")

    @staticmethod
    def _records_jsonl(fh, first: int) -> Iterator[tuple[int, str, Any]]:
        ri = 0
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue  # blank lines are not records
            if ri >= first:
                yield ri, f"line {lineno}", line
            ri += 1

    def _records_txt(self, fh, first: int) -> Iterator[tuple[int, str, Any]]:
        ri = 0
        if self.txt_mode == "line":
            for lineno, line in enumerate(fh, 1):
                if ri >= first:
                    yield ri, f"line {lineno}", ("txt", [(lineno, line)])
                ri += 1
            return
        block: list[tuple[int, bytes]] = []
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                block.append((lineno, line))
                continue
            if block:
                if ri >= first:
                    yield ri, f"line {block[0][0]}", ("txt", block)
                ri += 1
                block = []
        if block and ri >= first:
            yield ri, f"line {block[0][0]}", ("txt", block)

    def _records_json_array(self, path: Path, fh, first: int) -> Iterator[tuple[int, str, Any]]:
        data = fh.read()
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            self._bad("invalid_utf8", f"{path}: line {line}: invalid UTF-8 ({e.reason})")
            return
        except json.JSONDecodeError as e:
            self._bad("malformed_json", f"{path}: line {e.lineno}: malformed JSON ({e.msg})")
            return
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of records or JSON Lines")
        for ri in range(first, len(items)):
            yield ri, f"element {ri}", ("json", items[ri])

    def _records_parquet(self, path: Path, first: int) -> Iterator[tuple[int, str, Any]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_column not in names:
            self._bad("missing_column", f"{path}: no column {self.text_column!r} (columns: {names})")
            return
        row0 = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row0 + n > first:
                col = pf.read_row_group(rg, columns=[self.text_column]).column(0).to_pylist()
                for j in range(max(0, first - row0), n):
                    yield row0 + j, f"row {row0 + j}", ("parquet", col[j])
            row0 += n

    def _decode(self, path: Path, loc: str, raw: Any) -> str | None:
        """Text of one record, or None after a skipped error (on_error='skip')."""
        if isinstance(raw, bytes):  # a JSON line, parsed only by the reader that owns it
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self._bad("invalid_utf8", f"{path}: {loc}: invalid UTF-8 at byte {e.start}")
                return None
            except json.JSONDecodeError as e:
                self._bad("malformed_json", f"{path}: {loc}: malformed JSON ({e.msg} at column {e.colno})")
                return None
            return self._text_of(path, loc, record)
        kind, value = raw
        if kind == "json":
            return self._text_of(path, loc, value)
        if kind == "txt":  # [(lineno, bytes), ...]
            parts = []
            for lineno, line in value:
                try:
                    parts.append(line.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    self._bad("invalid_utf8", f"{path}: line {lineno}: invalid UTF-8 at byte {e.start}")
                    return None
            return "\n".join(parts)
        # parquet: a null counts as an empty document
        if value is None or isinstance(value, str):
            return value
        self._bad("bad_text", f"{path}: {loc}: column {self.text_column!r} is "
                  f"{type(value).__name__}, not a string")
        return None

    def _text_of(self, path: Path, loc: str, record: Any) -> str | None:
        if isinstance(record, str):  # a bare string is the document itself
            return record
        if not isinstance(record, dict) or self.text_column not in record:
            keys = list(record)[:10] if isinstance(record, dict) else type(record).__name__
            self._bad("missing_column", f"{path}: {loc}: no {self.text_column!r} key (found {keys})")
            return None
        text = record[self.text_column]
        if text is None or isinstance(text, str):
            return text
        self._bad("bad_text", f"{path}: {loc}: {self.text_column!r} is {type(text).__name__}, not a string")
        return None


def _split_of(path: Path) -> str | None:
    """The split a file belongs to by HF naming conventions (train-00000.jsonl, c4-validation.x.json.gz)."""
    words = Path(str(path).lower()).name.replace("_", "-").replace(".", "-").split("-")
    for split, aliases in SPLIT_ALIASES.items():
        if any(w in aliases for w in words):
            return split
    return None


def find_files(spec: str, split: str | None = None, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Sorted data files of a path, directory (recursive) or glob. In a directory whose files are
    named by split (train-*, *validation*), only `split`'s files. `formats`: the accepted file types."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p, formats)[0])
        if not files:
            raise DataError(f"{spec}: no data files in directory (supported: "
                            f"{', '.join(formats)}, optionally {', '.join(COMPRESSIONS)})")
        named = {p: _split_of(p.relative_to(path)) for p in files}
        if split and any(named.values()):
            files = [p for p in files if named[p] == split]
            if not files:
                raise DataError(f"{spec}: no files for split {split!r} (found splits "
                                f"{sorted(set(v for v in named.values() if v))})")
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: no files match this pattern")
    else:
        raise DataError(f"{spec}: no such file or directory (a source is 'c4', 'hf:NAME[:CONFIG][:SPLIT]', "
                        "'demo', or a local file, directory or glob)")
    for p in files:
        if not file_format(p, formats)[0]:
            raise DataError(f"{p}: unsupported file type (supported: {', '.join(formats)}, "
                            f"optionally compressed {', '.join(COMPRESSIONS)})")
    return files


# ----------------------------------------------------------------------------- HF datasets


class HFSource(Source):
    """A Hugging Face dataset streamed with `datasets` (imported only here)."""

    def __init__(self, path: str, config: str | None, split: str, *, text_column: str = "text",
                 on_error: str = "raise"):
        super().__init__(on_error=on_error)
        self.path, self.config, self.split, self.text_column = path, config, split, text_column
        self.name = f"hf:{path}" + (f":{config}" if config else "") + f":{split}"

    def describe(self) -> dict:
        return {"name": self.name}

    def summary(self) -> str:
        return f"{self.name} (HF datasets, streamed)"

    def _load(self):
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"source {self.name} needs the `datasets` package: pip install datasets "
                            "(or pip install 'nanot5[hub]')") from e
        try:
            return datasets.load_dataset(self.path, self.config, split=self.split, streaming=True)
        except Exception as e:  # network, unknown dataset/config/split: say which source failed
            raise DataError(f"{self.name}: cannot open dataset: {type(e).__name__}: {e}") from e

    def documents(self, reader_id: int = 0, num_readers: int = 1, *, start: Any = None
                  ) -> Iterator[tuple[Any, str]]:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self._load(), rank=reader_id, world_size=num_readers)
        # position = {"n": examples of this reader's stream before it, "state": dataset state or None}
        n = 0
        resumable = hasattr(ds, "state_dict") and hasattr(ds, "load_state_dict")
        if start is not None:
            n = int(start["n"])
            if resumable and start.get("state") is not None:
                ds.load_state_dict(start["state"])
            elif n:
                ds = ds.skip(n)  # no state support: replay the stream up to the position
        # a dataset's state exists only once iteration started: the first record's position is `start`
        state = None if start is None else start.get("state")
        it = iter(ds)
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            pos = {"n": n, "state": state}
            loc = f"example {n} of reader {reader_id}/{num_readers}"
            n += 1
            state = ds.state_dict() if resumable else None  # = position of the next record
            text = record.get(self.text_column) if isinstance(record, dict) else None
            if not isinstance(text, str):
                if text is None and self.text_column in record:
                    continue  # null text: an empty document
                what = "no" if self.text_column not in record else f"a non-string ({type(text).__name__})"
                self._bad("missing_column", f"{self.name}: {loc}: {what} {self.text_column!r} column "
                          f"(columns: {list(record)})")
                continue
            if text.strip():
                yield pos, text


# ----------------------------------------------------------------------------- entry point


def open_source(spec: str, *, split: str = "train", text_column: str = "text", txt_mode: str = "paragraph",
                on_error: str = "raise") -> Source:
    """Open a text source.

    spec: 'c4' (allenai/c4 `en`, streamed; needs the network and `datasets`),
    'hf:NAME[:CONFIG][:SPLIT]' (any HF dataset; SPLIT overrides `split`), 'demo' (the offline corpus
    built by `nanot5 data prepare demo`), or a local file, directory or glob of .jsonl/.json/.txt/
    .parquet files (optionally .gz/.zst). In a directory whose files carry split names, `split` picks
    them. Empty or whitespace-only documents are skipped silently; bad records raise a DataError
    naming file and line, or are counted in `source.skipped` with on_error='skip'.
    """
    kw = dict(on_error=on_error)
    if spec in HUB_SOURCES:
        name, config = HUB_SOURCES[spec]
        return HFSource(name, config, split, text_column=text_column, **kw)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise DataError(f"bad source {spec!r}: expected hf:NAME[:CONFIG][:SPLIT]")
        config = parts[1] if len(parts) > 1 and parts[1] else None
        return HFSource(parts[0], config, parts[2] if len(parts) > 2 else split, text_column=text_column, **kw)
    if spec == "demo":
        root = demo_dir()
        files = sorted(root.glob(f"{split}-*.jsonl.gz"))
        if not files:
            raise DataError(f"demo corpus split {split!r} not found in {root}: build it with "
                            "`nanot5 data prepare demo` (or set NANOT5_CACHE to where it is)")
        return LocalSource(files, name=f"demo:{split}", text_column="text", on_error=on_error)
    files = find_files(spec, split)
    return LocalSource(files, name=spec, text_column=text_column, txt_mode=txt_mode, on_error=on_error)
