"""Any sequence-to-sequence data for fine-tuning: records from files or HF datasets -> (input text, references).

    nanot5 finetune data.source=train.jsonl data.input_column=document data.target_column=summary \\
        data.template="summarize: {document}" data.validation_fraction=0.05

Sources (`data.source`, `data.validation_source`): a local .jsonl/.json/.csv/.tsv/.parquet file (optionally .gz
or .zst compressed), a directory (recursive; in one whose files are named by split, e.g. train.jsonl and
validation.jsonl, only the split's files) or a glob, or `hf:NAME[:CONFIG][:SPLIT]` (any HF dataset, streamed
with `datasets`, imported only then). A .json file holds an array of objects (or JSON Lines); CSV/TSV files
have a header row (RFC 4180 quoting; TSV is the same with tabs).

Each record (a dict of columns) becomes one example:
    input       = data.template.format_map(record) if a template is set, else record[data.input_column]
    references  = [data.target_template.format_map(record)] if set, else record[data.target_column]: a string
                  (numbers are written with str()) or a non-empty list of acceptable strings (the model trains
                  on one drawn per epoch; metrics take the best match)
Templates are Python format strings over the columns ("summarize: {document}", "{question} context: {context}",
"{answers[text][0]}"; "{{" is a literal brace). A record whose input/target is missing or null is a bad record.
The FIRST record of a source is checked against the configuration: if it lacks a column the configuration
names, that is a configuration mistake and always a DataError listing the columns the data has. Later bad records
raise a DataError naming file and line, or are counted and skipped with data.on_error=skip (the pre-training
rules of nanot5/data/sources.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanot5.data.sources import (
    SPLIT_ALIASES,
    _open_binary,
    _split_of,
    file_format,
    find_files,
)
from nanot5.errors import ConfigError, DataError

log = logging.getLogger("nanot5.data")

RECORD_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class _BadRecord(Exception):
    """A record that cannot be used: `kind` counts it, the message names it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------------- templates


def template_columns(template: str, key: str = "data.template") -> list[str]:
    """The columns a format template reads (the root of each field: "{answers[text][0]}" -> "answers").

    Raises ConfigError (naming `key`) for a malformed template, a positional field ("{}", "{0}") or no field.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{key}={template!r} is not a valid template ({e}); write columns as {{name}} and "
                          "literal braces as {{ and }}") from None
    roots = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ConfigError(f"{key}={template!r} has a positional field {{{name}}}; name a column, "
                              "e.g. {input}")
        if root not in roots:
            roots.append(root)
    if not roots:
        raise ConfigError(f"{key}={template!r} names no column; use e.g. 'summarize: {{input}}'")
    return roots


class RecordFormatter:
    """A raw record (dict of columns) -> (input text, list of reference texts), per the data.* settings."""

    def __init__(self, *, input_column: str = "input", target_column: str = "target", template: str = "",
                 target_template: str = ""):
        self.input_column, self.target_column = input_column, target_column
        self.template, self.target_template = template, target_template
        self.input_columns = template_columns(template) if template else [input_column]
        self.target_columns = (template_columns(target_template, "data.target_template") if target_template
                               else [target_column])

    def _what(self, column: str) -> str:
        """How the configuration names a column, for messages."""
        if column in self.input_columns and self.template:
            return f"data.template {self.template!r} names column {column!r}"
        if column in self.target_columns and self.target_template:
            return f"data.target_template {self.target_template!r} names column {column!r}"
        key = "data.input_column" if column in self.input_columns else "data.target_column"
        return f"no column {column!r} ({key})"

    def check_first(self, record: Any, loc: str) -> None:
        """The first record must have every column the configuration names: else a DataError (not skippable)."""
        if not isinstance(record, dict):
            raise DataError(f"{loc}: expected a record with named columns, got {type(record).__name__}")
        for column in self.input_columns + self.target_columns:
            if column not in record:
                raise DataError(f"{loc}: {self._what(column)}, but the data has columns {list(record)}; "
                                "set data.input_column/data.target_column or fix the template")

    def __call__(self, record: Any) -> tuple[str, list[str]]:
        if not isinstance(record, dict):
            raise _BadRecord("not_a_record", f"expected a record with named columns, got {type(record).__name__}")
        for column in self.input_columns + self.target_columns:
            if column not in record:
                raise _BadRecord("missing_column", f"{self._what(column)} (record has {list(record)[:10]})")
            if record[column] is None:
                raise _BadRecord("null_value", f"column {column!r} is null")
        if self.template:
            text = self._format(self.template, record, "data.template")
        else:
            text = self._scalar(record[self.input_column], self.input_column)
        if self.target_template:
            refs = [self._format(self.target_template, record, "data.target_template")]
        else:
            refs = self._references(record[self.target_column])
        return text, refs

    @staticmethod
    def _format(template: str, record: dict, key: str) -> str:
        try:
            return template.format_map(record)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise _BadRecord("template_error", f"{key} {template!r} cannot be filled: {type(e).__name__}: {e}")

    @staticmethod
    def _scalar(value: Any, column: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):  # labels stored as numbers (bool is an int too)
            return str(value)
        raise _BadRecord("bad_value", f"column {column!r} is a {type(value).__name__}, not a string")

    def _references(self, value: Any) -> list[str]:
        if isinstance(value, (list, tuple)):
            if not value:
                raise _BadRecord("empty_target", f"column {self.target_column!r} is an empty list")
            return [self._scalar(v, self.target_column) for v in value]
        return [self._scalar(value, self.target_column)]


# ---------------------------------------------------------------------------------------------------- reading


def _hf_parts(spec: str) -> tuple[str, str | None, str | None]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad source {spec!r}: expected hf:NAME[:CONFIG][:SPLIT]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else None
    return parts[0], config, split


def _hf_records(spec: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"source {spec} needs the `datasets` package: pip install datasets") from e
    path, config, explicit = _hf_parts(spec)
    split = explicit or split
    name = f"hf:{path}" + (f":{config}" if config else "") + f":{split}"
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True)
        it = iter(ds)
    except Exception as e:  # network, unknown dataset/config/split: say which source failed
        raise DataError(f"{name}: cannot open dataset: {type(e).__name__}: {e}") from e
    for n, record in enumerate(it):
        yield f"{name}: example {n}", record


def _hf_split_names(spec: str) -> list[str]:
    """The splits an HF dataset has, or [] when they cannot be listed."""
    try:
        import datasets

        path, config, _ = _hf_parts(spec)
        return list(datasets.get_dataset_split_names(path, config))
    except Exception:  # noqa: BLE001 - no listing means: no default validation split
        return []


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


class _Reader:
    """Records of local files, with bad-record handling shared with pre-training (raise or count and skip)."""

    def __init__(self, on_error: str, skipped: Counter):
        self.on_error, self.skipped = on_error, skipped

    def bad(self, kind: str, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(message + " (set data.on_error=skip to skip bad records)")
        if not self.skipped:
            log.warning("skipping bad input: %s; further bad records are counted", message)
        self.skipped[kind] += 1

    def records(self, path: Path) -> Iterator[tuple[str, Any]]:
        fmt, comp = file_format(path, RECORD_FORMATS)
        try:
            if fmt == ".parquet":
                yield from self._parquet(path)
            elif fmt in (".csv", ".tsv"):
                yield from self._csv(path, comp, "\t" if fmt == ".tsv" else ",")
            else:
                yield from self._json(path, comp, fmt)
        except (OSError, EOFError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            self.bad("unreadable_file", f"{path}: cannot read file: {type(e).__name__}: {e}")

    def _json(self, path: Path, comp: str, fmt: str) -> Iterator[tuple[str, Any]]:
        with _open_binary(path, comp) as fh:
            if fmt == ".json" and fh.peek(64).lstrip()[:1] == b"[":
                data = fh.read()
                try:
                    items = json.loads(data.decode("utf-8"))
                except UnicodeDecodeError as e:
                    self.bad("invalid_utf8", f"{path}: line {_line_of(data, e.start)}: invalid UTF-8")
                    return
                except json.JSONDecodeError as e:
                    self.bad("malformed_json", f"{path}: line {e.lineno}: malformed JSON ({e.msg})")
                    return
                for i, item in enumerate(items):
                    yield f"{path}: element {i}", item
                return
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                loc = f"{path}: line {lineno}"
                try:
                    yield loc, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    self.bad("invalid_utf8", f"{loc}: invalid UTF-8 at byte {e.start}")
                except json.JSONDecodeError as e:
                    self.bad("malformed_json", f"{loc}: malformed JSON ({e.msg} at column {e.colno})")

    def _csv(self, path: Path, comp: str, delimiter: str) -> Iterator[tuple[str, Any]]:
        with _open_binary(path, comp) as raw:
            data = raw.read()
        try:
            text = data.decode("utf-8-sig")  # a BOM (Excel) is not part of the first column's name
        except UnicodeDecodeError as e:
            self.bad("invalid_utf8", f"{path}: line {_line_of(data, e.start)}: invalid UTF-8")
            return
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # documents longer than csv's 128 KiB default
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: line 1: unreadable header ({e})") from None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                self.bad("malformed_csv", f"{path}: line {reader.line_num}: {e}")
                return  # the reader cannot continue after a CSV error
            loc = f"{path}: line {reader.line_num}"
            if not row:
                continue  # blank line
            if len(row) != len(header):
                self.bad("malformed_csv", f"{loc}: {len(row)} fields where the header {header} has {len(header)}")
                continue
            yield loc, dict(zip(header, row))

    @staticmethod
    def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield f"{path}: row {n}", row
                n += 1


def _local_files(spec: str, split: str) -> list[Path]:
    if not any(c in spec for c in "*?[") and not Path(spec).expanduser().exists():
        raise DataError(f"{spec}: no such file or directory (data.source is 'sni', 'hf:NAME[:CONFIG][:SPLIT]' or "
                        f"a local {'/'.join(RECORD_FORMATS)} file, directory or glob)")
    return find_files(spec, split, RECORD_FORMATS)


def _has_split_files(spec: str, split: str) -> bool:
    """True when `spec` is a directory with files named for `split` (e.g. validation.jsonl, dev-000.csv)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return False
    return any(_split_of(p.relative_to(path)) == split for p in path.rglob("*")
               if p.is_file() and file_format(p, RECORD_FORMATS)[0])


def load_records(spec: str, *, split: str = "train", formatter: RecordFormatter, on_error: str = "raise",
                 skipped: Counter | None = None) -> list[dict[str, Any]]:
    """The examples of one source: dicts with id, input, references, loc.

    id: the record's own `id` column when it has a string or integer one, else its number in the source (0, 1, ..);
    loc: where it comes from ("file: line N", "file: row N", "hf:NAME:SPLIT: example N"), for messages.
    Bad records raise DataError, or with on_error='skip' are counted in `skipped` by kind.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    skipped = Counter() if skipped is None else skipped
    reader = _Reader(on_error, skipped)
    if spec.startswith("hf:"):
        streams = [_hf_records(spec, split)]
    else:
        streams = [reader.records(p) for p in _local_files(spec, split)]
    out: list[dict[str, Any]] = []
    for stream in streams:
        first = True
        for loc, record in stream:
            if first:
                formatter.check_first(record, loc)
                first = False
            try:
                text, refs = formatter(record)
            except _BadRecord as e:
                reader.bad(e.kind, f"{loc}: {e}")
                continue
            rid = record.get("id")
            rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else str(len(out))
            out.append({"id": rid, "input": text, "references": refs, "loc": loc})
    return out


# ---------------------------------------------------------------------------------------------------- splits


@dataclass
class Seq2SeqSplits:
    """Training and validation examples of a fine-tuning run, and what was read (for the log / summary)."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] | None  # None: no validation set (no held-out loss, no generation metrics)
    report: dict[str, Any] = field(default_factory=dict)


def _describe_source(spec: str, split: str) -> str:
    if spec.startswith("hf:"):
        return spec
    files = _local_files(spec, split)
    names = ", ".join(str(p) for p in files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
    return names


def load_seq2seq_splits(source: str, *, validation_source: str = "", validation_fraction: float = 0.0,
                        seed: int = 0, input_column: str = "input", target_column: str = "target",
                        template: str = "", target_template: str = "", on_error: str = "raise"
                        ) -> Seq2SeqSplits:
    """Training and validation examples, as the data.* keys of the same names say.

    Validation: `validation_source` if given; else `validation_fraction` of the training records, held out with
    random.Random(seed) (the rest, in file order, trains); else the source's own validation split when it has
    one (a directory with validation-named files, or an HF dataset listing a validation/valid/dev split, when
    `source` names no split); else None. An empty training or validation set is a DataError.
    """
    if validation_source and validation_fraction > 0:
        raise ConfigError("set data.validation_source or data.validation_fraction, not both")
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {validation_fraction}")
    fmt = RecordFormatter(input_column=input_column, target_column=target_column, template=template,
                          target_template=target_template)
    skipped = {"train": Counter(), "validation": Counter()}
    train = load_records(source, split="train", formatter=fmt, on_error=on_error, skipped=skipped["train"])
    report: dict[str, Any] = {"train_source": _describe_source(source, "train"), "skipped": skipped}
    if not train:
        raise DataError(f"data.source={source}: no usable training records"
                        + (f" (skipped {dict(skipped['train'])})" if skipped["train"] else ""))

    validation = None
    val_spec = validation_source
    if not val_spec and validation_fraction == 0:
        if source.startswith("hf:"):
            if _hf_parts(source)[2] is None:
                names = _hf_split_names(source)
                found = next((s for s in names if s in SPLIT_ALIASES["validation"]), None)
                if found:
                    path, config, _ = _hf_parts(source)
                    val_spec = f"hf:{path}:{config or ''}:{found}"
        elif _has_split_files(source, "validation"):
            val_spec = source
    if val_spec:
        validation = load_records(val_spec, split="validation", formatter=fmt, on_error=on_error,
                                  skipped=skipped["validation"])
        report["validation_source"] = _describe_source(val_spec, "validation")
        if not validation:
            raise DataError(f"the validation split ({report['validation_source']}) has no usable records"
                            + (f" (skipped {dict(skipped['validation'])})" if skipped["validation"] else ""))
    elif validation_fraction > 0:
        n = len(train)
        k = round(n * validation_fraction)
        if k == 0 or k == n:
            raise DataError(f"data.validation_fraction={validation_fraction} of {n} training records holds out "
                            f"{k}: the {'validation' if k == 0 else 'training'} split would be empty; change it "
                            "or set data.validation_source")
        held = set(random.Random(seed).sample(range(n), k))
        validation = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        report["validation_source"] = (f"{k} of {n} training records held out (data.validation_fraction="
                                       f"{validation_fraction}, seed {seed})")
    return Seq2SeqSplits(train=train, validation=validation, report=report)
