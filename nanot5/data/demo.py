"""The offline demo corpus: English prose from Debian's documentation packages.

`nanot5 data prepare demo` downloads `python3-doc` and `linux-doc` with `apt-get download` (no
install, no root beyond apt's own lists), unpacks them with `dpkg -x`, turns their reStructuredText
sources (`html/_sources/**/*.rst.txt`) into clean paragraphs, de-duplicates them, groups them into
documents and writes shuffled, sharded `train-0000N.jsonl.gz` / `validation-00000.jsonl.gz` (about 2%
of the documents held out) plus `meta.json` to ~/.cache/nanot5/corpora/demo ($NANOT5_CACHE overrides
the root). `open_source("demo")` reads it; `demo_tokenizer()` trains (once) a tokenizer on it.

The reST cleaner is deliberately simple: it keeps paragraphs of prose and drops everything that is
not a sentence (headings, directives whose body is code or tables, literal blocks, doctests, tables,
field lists, URLs, lines of mostly symbols), then strips inline markup (:func:`x` -> x).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from nanot5.data.sources import DataError, demo_dir

PACKAGES = ("python3-doc", "linux-doc")
DEMO_VERSION = 1
DOC_CHARS = 4000  # documents are runs of paragraphs of one source file, up to about this long
VALIDATION_FRACTION = 0.02
SHARD_CHARS = 5_000_000
SEED = 0

ALTERNATIVES = ("use another source instead: data.source=c4 (allenai/c4 streamed from the HF hub; needs "
                "the network and `pip install datasets`), data.source=hf:NAME[:CONFIG][:SPLIT] (any HF dataset), "
                "or local files: data.source=/path/to/*.jsonl.gz (also .jsonl .json .txt .parquet .zst)")

# ----------------------------------------------------------------------------- reST -> paragraphs

# Directives whose body is prose (admonitions, API descriptions): drop the directive line, keep the body.
# Every other directive (code-block, toctree, tables, images, math, kernel-doc, ...) is dropped whole.
PROSE_DIRECTIVES = {
    "note", "warning", "tip", "important", "hint", "attention", "caution", "danger", "error", "admonition",
    "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed", "impl-detail", "topic",
    "sidebar", "glossary", "container", "function", "method", "class", "attribute", "data", "exception",
    "decorator", "decoratormethod", "classmethod", "staticmethod", "abstractmethod", "coroutinefunction",
    "coroutinemethod", "describe", "object", "option", "cmdoption", "envvar", "opcode", "pdbcommand",
    "c:function", "c:type", "c:macro", "c:member", "c:var", "c:struct", "c:union", "c:enum", "c:enumerator",
}
ADMONITIONS = {"note", "warning", "tip", "important", "hint", "attention", "caution", "danger", "error", "seealso"}
DIRECTIVE = re.compile(r"\.\.\s+([\w:.-]+)::")
ADORNMENT = re.compile(r"""^([=\-~^*#+"'`:._!$%&,;<>?@|/\\])\1{2,}\s*$""")  # heading under/overlines
TABLE_LINE = re.compile(r"^(\+[-=+]{2,}|\|.*\|\s*$|=+(\s+=+)+\s*$)")
FIELD = re.compile(r"^:[^:`\s][^:`]*:(\s|$)")  # ":param x: ..." / ":synopsis: ..." (not a :role:`...`)
BULLET = re.compile(r"^([-*+•]|#\.|\d+\.|\(?[a-zA-Z0-9]\))\s+")
ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)?:`([^`]*)`")
LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
NAMED_REF = re.compile(r"`([^`]+)`__?")
LITERAL = re.compile(r"``(.+?)``")
STRONG_EMPH = re.compile(r"(\*\*|\*)(?=\S)(.+?)(?<=\S)\1")
FOOTNOTE_REF = re.compile(r"\s*\[(#[\w-]*|\d+|\*)\]_")
SIMPLE_REF = re.compile(r"(?<![\w_])([A-Za-z][A-Za-z0-9]*)__?(?=[\s.,;:)]|$)")
SUBSTITUTION = re.compile(r"\|([\w .-]+)\|")
URL = re.compile(r"<?\b(?:https?|ftp)://[^\s>]+>?|<?\bwww\.[^\s>]+>?|<[\w.+-]+@[\w.-]+>")
CODEY = set("_=(){}[]<>/\\$#@;|~^")


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    explicit = re.match(r"(.*?)\s*<[^<>]*>$", text, re.S)  # :ref:`the text <label>`
    if explicit and explicit.group(1):
        return explicit.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):  # :func:`~os.path.join` shows join
        text = text[1:].rsplit(".", 1)[-1]
    return text


def clean_inline(text: str) -> str:
    """Strip reST inline markup, references and URLs from one paragraph's text."""
    text = ROLE.sub(_role_text, text)
    text = LINK.sub(lambda m: m.group(1), text)
    text = NAMED_REF.sub(lambda m: m.group(1), text)
    text = LITERAL.sub(lambda m: m.group(1), text)
    text = STRONG_EMPH.sub(lambda m: m.group(2), text)
    text = FOOTNOTE_REF.sub("", text)
    text = SIMPLE_REF.sub(lambda m: m.group(1), text)
    text = SUBSTITUTION.sub(lambda m: m.group(1), text)
    text = URL.sub("", text)
    text = text.replace("\\ ", "").replace("\\", "")
    text = re.sub(r"\s\((\s*|see\s*)\)", "", text)  # "(see )" left by a removed URL
    return re.sub(r"\s+", " ", text).strip()


def is_prose(text: str) -> bool:
    """A sentence-like paragraph: enough words, mostly letters, little code, ends like a sentence."""
    words = text.split()
    if len(words) < 8 or text[-1] not in '.!?:)"\'':
        return False
    chars = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in chars) < 0.75 * len(chars):
        return False
    return sum(any(c in CODEY for c in w) for w in words) <= 0.2 * len(words)


def _mostly_symbols(line: str) -> bool:
    return sum(c.isalnum() or c.isspace() for c in line) < 0.6 * len(line)


def rst_paragraphs(text: str) -> list[str]:
    """Clean English paragraphs of one reST document, in order."""
    out: list[str] = []
    para: list[str] = []  # lines of the paragraph being read
    para_indent = 0
    bad = False  # the paragraph is a table, doctest or diagram
    skip_deeper: int | None = None  # skip lines indented deeper than this (literal blocks, dropped directives)

    def flush() -> bool:
        """Emit the paragraph; True if it introduced a literal block ('::' at its end)."""
        nonlocal para, bad
        literal = bool(para) and para[-1].rstrip().endswith("::")
        if para and not bad:
            joined = " ".join(para)
            if literal:  # "Example::" reads "Example:", "text ::" reads "text", "::" disappears
                joined = joined[:-2].rstrip() + (":" if not joined.endswith(" ::") else "")
            joined = clean_inline(joined)
            if joined and is_prose(joined):
                out.append(joined)
        para, bad = [], False
        return literal

    for raw_line in text.expandtabs(8).splitlines():
        stripped = raw_line.strip()
        indent = len(raw_line) - len(raw_line.lstrip())
        if skip_deeper is not None:
            if not stripped or indent > skip_deeper:
                continue
            skip_deeper = None
        if not stripped:
            if flush():
                skip_deeper = para_indent
            continue
        if stripped.startswith(".. ") or stripped == "..":
            flush()
            m = DIRECTIVE.match(stripped)
            if not (m and m.group(1).lower() in PROSE_DIRECTIVES):
                skip_deeper = indent  # comments, targets, code, tables, toctrees: drop with their body
            elif m.group(1).lower() in ADMONITIONS and stripped[m.end():].strip():
                para, para_indent = [stripped[m.end():].strip()], indent + 3  # ".. note:: Text" starts the body
            continue
        if ADORNMENT.match(stripped):
            para, bad = [], False  # a heading (its title is the pending line) or a transition
            continue
        if TABLE_LINE.match(stripped) or stripped.startswith(">>>"):
            bad = True
        if FIELD.match(stripped):
            continue
        if _mostly_symbols(clean_inline(stripped)):
            bad = True
        m = BULLET.match(stripped)
        if m:  # a list item starts a paragraph of its own
            flush()
            stripped = stripped[m.end():]
        if not para:
            para_indent = indent
        para.append(stripped)
    flush()
    return out


def documents_of(paragraphs: list[str], max_chars: int = DOC_CHARS) -> list[str]:
    """Group consecutive paragraphs into documents of up to ~max_chars (one paragraph per line)."""
    docs, current, size = [], [], 0
    for p in paragraphs:
        if current and size + len(p) > max_chars:
            docs.append("\n".join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + 1
    if current:
        docs.append("\n".join(current))
    return docs


# ----------------------------------------------------------------------------- Debian packages


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _require_tools() -> None:
    missing = [t for t in ("apt-get", "dpkg", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        raise DataError(f"`nanot5 data prepare demo` needs Debian's package tools ({', '.join(missing)} not "
                        f"found) to download the {' and '.join(PACKAGES)} packages; {ALTERNATIVES}")


def _apt_download(packages: list[str], dest: Path) -> None:
    result = _run(["apt-get", "download", *packages], cwd=dest)
    if result.returncode != 0 and re.search(r"Unable to locate package|has no installation candidate",
                                            result.stderr):
        print("apt-get download found no package lists; running apt-get update", flush=True)
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise DataError(f"apt-get update failed (run `sudo apt-get update` once, then retry):\n"
                            f"{update.stderr.strip()[-2000:]}\nor {ALTERNATIVES}")
        result = _run(["apt-get", "download", *packages], cwd=dest)
    if result.returncode != 0:
        raise DataError(f"apt-get download {' '.join(packages)} failed:\n{result.stderr.strip()[-2000:]}\n"
                        f"Or {ALTERNATIVES}")


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def download_packages(dest: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Download `packages` and, for metapackages such as python3-doc -> python3.11-doc, their `-doc`
    dependencies; return the .deb files."""
    wanted, seen = list(packages), set()
    for _ in range(3):  # metapackage -> versioned package -> (nothing more)
        todo = [p for p in wanted if p not in seen]
        if not todo:
            break
        print(f"apt-get download {' '.join(todo)}", flush=True)
        _apt_download(todo, dest)
        seen.update(todo)
        for deb in dest.glob("*.deb"):
            for dep in _deb_field(deb, "Depends").split(","):
                name = re.split(r"[\s(|:]", dep.strip(), maxsplit=1)[0]
                if re.search(r"-doc(-[\d.]+)?$", name) and name not in seen:  # python3.11-doc, linux-doc-6.1
                    wanted.append(name)
    return sorted(dest.glob("*.deb"))


def extract(debs: list[Path], dest: Path) -> dict[str, str]:
    """`dpkg -x` every package into dest; return {package: version}."""
    versions = {}
    for deb in debs:
        result = _run(["dpkg", "-x", str(deb), str(dest)])
        if result.returncode != 0:
            raise DataError(f"dpkg -x {deb.name} failed: {result.stderr.strip()[-2000:]}")
        versions[_deb_field(deb, "Package")] = _deb_field(deb, "Version")
    return versions


def rst_sources(root: Path) -> list[Path]:
    """reST sources of the unpacked documentation: html/_sources/**/*.rst.txt of each package (without
    the kernel's non-English translations/), else its Documentation/**/*.rst(.gz)."""
    files = []
    for pkg in sorted((root / "usr" / "share" / "doc").glob("*")):
        if pkg.is_symlink():  # metapackages link to the versioned package's folder (python3 -> python3.11)
            continue
        found = sorted(pkg.glob("**/_sources/**/*.rst.txt"))
        if not found:
            found = sorted(p for p in pkg.glob("Documentation/**/*") if p.name.endswith((".rst", ".rst.gz")))
        files += [p for p in found if "translations" not in p.relative_to(pkg).parts]
    # symlinked folders inside a package would list a file twice
    unique = {p.resolve(): p for p in reversed(files)}
    return sorted(unique.values())


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- build


def _write_jsonl_gz(path: Path, records: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:  # reproducible bytes
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def build_corpus(root: Path, out: Path) -> dict:
    """Convert the unpacked packages under `root` into the sharded corpus in `out`; return its meta."""
    files = rst_sources(root)
    if not files:
        raise DataError(f"no reST sources (html/_sources/**/*.rst.txt) in the unpacked packages under {root}")
    print(f"converting {len(files)} reST files to paragraphs", flush=True)
    seen: set[str] = set()
    docs: list[dict] = []
    n_para = n_dup = 0
    doc_root = root / "usr" / "share" / "doc"
    for i, path in enumerate(files, 1):
        kept = []
        for p in rst_paragraphs(_read_text(path)):
            n_para += 1
            key = hashlib.sha1(re.sub(r"\W+", " ", p.lower()).encode()).hexdigest()
            if key in seen:
                n_dup += 1
                continue
            seen.add(key)
            kept.append(p)
        name = str(path.relative_to(doc_root)).replace("/html/_sources/", ":").removesuffix(".txt")
        docs += [{"text": d, "source": name} for d in documents_of(kept)]
        if i % 500 == 0 or i == len(files):
            chars = sum(len(d["text"]) for d in docs)
            print(f"  {i}/{len(files)} files, {len(docs):,} documents, {chars / 1e6:.1f}M chars", flush=True)
    # held-out split by document, then shuffle so every shard mixes both manuals
    order = np.random.default_rng(SEED).permutation(len(docs))
    n_val = max(1, round(VALIDATION_FRACTION * len(docs)))
    splits = {"validation": [docs[i] for i in order[:n_val]], "train": [docs[i] for i in order[n_val:]]}
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    for split, records in splits.items():
        shards[split], start, size = [], 0, 0
        for j, r in enumerate(records):
            size += len(r["text"])
            if size >= SHARD_CHARS or j == len(records) - 1:
                shards[split].append(f"{split}-{len(shards[split]):05d}.jsonl.gz")
                _write_jsonl_gz(out / shards[split][-1], records[start:j + 1])
                start, size = j + 1, 0
    meta = {
        "name": "demo", "version": DEMO_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_files": len(files), "paragraphs": n_para, "duplicate_paragraphs_dropped": n_dup,
        "documents": {s: len(r) for s, r in splits.items()},
        "chars": {s: sum(len(d["text"]) for d in r) for s, r in splits.items()},
        "shards": shards, "seed": SEED,
    }
    return meta


def prepare_demo(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Build the demo corpus (once) and return its folder (default ~/.cache/nanot5/corpora/demo)."""
    out = Path(cache_dir) if cache_dir else demo_dir()
    ours = _is_demo_corpus(out)
    if ours and not force:
        print(f"demo corpus already prepared in {out} (use force=true to rebuild)", flush=True)
        return out
    if out.exists() and not ours and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not a nanot5 demo corpus; choose an empty or new folder "
                        "(nanot5 never deletes files it did not write)")
    _require_tools()
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nanot5-demo-") as tmp:
        tmp = Path(tmp)
        (tmp / "debs").mkdir()
        debs = download_packages(tmp / "debs")
        print(f"unpacking {', '.join(d.name for d in debs)}", flush=True)
        versions = extract(debs, tmp / "root")
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))  # same filesystem: atomic rename
        try:
            meta = build_corpus(tmp / "root", staging)
            meta["packages"] = versions
            (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            staging.chmod(0o755)  # mkdtemp made it private
            if out.exists():  # an empty folder, or our own corpus being rebuilt (force)
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    chars = meta["chars"]
    print(f"demo corpus ready in {out}: {meta['documents']['train']:,} train / {meta['documents']['validation']:,} "
          f"validation documents, {chars['train'] / 1e6:.1f}M / {chars['validation'] / 1e6:.2f}M chars "
          f"({meta['duplicate_paragraphs_dropped']:,} duplicate paragraphs dropped) in {time.time() - t0:.0f}s",
          flush=True)
    return out


def _is_demo_corpus(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("name") == "demo"
    except (OSError, ValueError, AttributeError):
        return False


def demo_tokenizer(vocab_size: int = 8000, force: bool = False) -> Path:
    """A T5-convention tokenizer (vocab_size pieces + 100 sentinels) trained on the demo corpus's train
    split, built once next to the corpus; returns its folder (prepares the corpus if needed)."""
    corpus = demo_dir() if _is_demo_corpus(demo_dir()) else prepare_demo()
    out = corpus / f"tokenizer-{vocab_size}"
    if (out / "tokenizer_config.json").exists() and not force:
        return out
    from nanot5.data.sources import open_source
    from nanot5.data.tokenizer import train_tokenizer

    print(f"training a {vocab_size}-piece tokenizer on the demo corpus -> {out}", flush=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=corpus))
    try:
        train_tokenizer(open_source("demo", split="train"), vocab_size, staging)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:  # another process (rank) finished first: use its copy
            if not (out / "tokenizer_config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def data_prepare_main(argv: list[str]) -> int:
    """`nanot5 data prepare demo [out=DIR] [force=true]` (argv starts with the corpus name)."""
    from nanot5.cliargs import kv_to_flags

    parser = argparse.ArgumentParser(prog="nanot5 data prepare", description="Build a data set.")
    parser.add_argument("corpus", choices=["demo"], help="demo: English prose from Debian's python3-doc and "
                        "linux-doc packages")
    parser.add_argument("--out", default=None, help=f"output folder (default {demo_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args(kv_to_flags(argv))
    prepare_demo(args.out, force=args.force)
    return 0
