"""Tokenizers: load an HF/local SentencePiece tokenizer; train a new one with T5's conventions.

`Tokenizer` wraps a `transformers` tokenizer and encodes through its Rust backend (`tokenizers`),
so ids are exactly those `transformers.AutoTokenizer` gives, batched and fast. T5 conventions
(Raffel et al. 2020, sec. 2.2 and 3.1.4): SentencePiece unigram vocabulary, pad 0, eos 1, unk 2, no
bos, and 100 sentinels `<extra_id_k>` above the SentencePiece pieces, `<extra_id_0>` the highest id.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

NUM_SENTINELS = 100
# Longer texts are tokenized in pieces cut at spaces: the Rust tokenizer keeps per-byte alignments and
# per-token strings and offsets, ~200 bytes per input character in all, so one 50 MB single-line document
# encoded whole would take ~10 GB. Pieces keep that bounded (a few MB each); a cut at a space gives the same
# ids as the whole text with T5's SentencePiece (the space becomes the next piece's word-start marker).
PIECE_CHARS = 100_000


class Tokenizer:
    """A thin, picklable wrapper around a `transformers` fast tokenizer.

    encode_batch() returns ids without EOS; encode() appends EOS like `tokenizer(text).input_ids`.
    """

    def __init__(self, hf_tokenizer, name: str = ""):
        self.hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", "")
        self._backend = hf_tokenizer.backend_tokenizer  # tokenizers.Tokenizer (Rust)
        self._encode_batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        self.eos_id: int = _required_id(hf_tokenizer, "eos")
        self.pad_id: int = _required_id(hf_tokenizer, "pad")
        self.unk_id: int | None = hf_tokenizer.unk_token_id
        self.vocab_size: int = len(hf_tokenizer)  # including added tokens (sentinels)
        self._sentinel0 = self._backend.token_to_id("<extra_id_0>")
        self.num_sentinels = 0
        while self._backend.token_to_id(f"<extra_id_{self.num_sentinels}>") is not None:
            self.num_sentinels += 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without EOS (batched in Rust; texts over PIECE_CHARS in bounded pieces)."""
        if all(len(t) <= PIECE_CHARS for t in texts):
            return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]
        short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
        out: list[list[int]] = [[] for _ in texts]
        for i, e in zip(short, self._encode_batch([texts[i] for i in short], add_special_tokens=False)):
            out[i] = e.ids
        for i, text in enumerate(texts):
            if len(text) > PIECE_CHARS:
                out[i] = self._encode_long(text)
        return out

    def _encode_long(self, text: str, batch: int = 16) -> list[int]:
        ids: list[int] = []
        pieces = _pieces(text, PIECE_CHARS)
        for k in range(0, len(pieces), batch):
            for e in self._encode_batch(pieces[k:k + batch], add_special_tokens=False):
                ids.extend(e.ids)
        return ids

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        """Token ids of one text, with EOS appended by default (T5's convention for model inputs)."""
        ids = self.encode_batch([text])[0]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list or 1-D array/tensor); special tokens dropped by default."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def sentinel_id(self, k: int) -> int:
        """Id of `<extra_id_k>` (32099 - k in T5)."""
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"tokenizer {self.name!r} has {self.num_sentinels} sentinels <extra_id_k>; "
                             f"asked for k={k}" + (" (span corruption needs them: load a T5-style tokenizer "
                                                   "with extra_ids=100)" if not self.num_sentinels else ""))
        return self._backend.token_to_id(f"<extra_id_{k}>")

    def token_id(self, token: str) -> int | None:
        """Id of a whole token of the vocabulary (a piece or an added token such as `<extra_id_0>`), or None."""
        return self._backend.token_to_id(token)

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy with `tokens` appended as special tokens: ids len(self), len(self) + 1, ... in order (after
        T5's sentinels, the highest ids so far). Special tokens are never split, and decode() drops them.
        Tokens already in the vocabulary keep their ids; this tokenizer is not changed."""
        import copy

        hf = copy.deepcopy(self.hf)
        hf.add_tokens([t for t in tokens if self.token_id(t) is None], special_tokens=True)
        return Tokenizer(hf, self.name)

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out))
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id}, "
                f"sentinels={self.num_sentinels})")


def _pieces(text: str, limit: int) -> list[str]:
    """Cut text into pieces of at most `limit` characters, each cut just before a space when there is one
    in the second half of the piece (else a hard cut)."""
    out, start = [], 0
    while start < len(text):
        end = start + limit
        if end < len(text):
            cut = text.rfind(" ", start + limit // 2, end)
            end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def _required_id(hf_tokenizer, which: str) -> int:
    value = getattr(hf_tokenizer, f"{which}_token_id")
    if value is None:
        raise ValueError(f"tokenizer {getattr(hf_tokenizer, 'name_or_path', '')!r} has no {which} token")
    return int(value)


def load_tokenizer(name_or_path: str | Path | Tokenizer) -> Tokenizer:
    """Load a tokenizer: a local folder (tokenizer.json and/or spiece.model), a SentencePiece `.model`
    file (treated as a T5 vocabulary: 100 sentinels added on top), or an HF hub name (needs the network
    unless cached)."""
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    import transformers

    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(f"{path}: expected a tokenizer folder or a SentencePiece .model file")
        with tempfile.TemporaryDirectory() as tmp:  # T5 loaders look for the name spiece.model
            shutil.copy(path, Path(tmp) / "spiece.model")
            return Tokenizer(_t5_class().from_pretrained(tmp, extra_ids=NUM_SENTINELS), name)
    if path.is_dir():
        if not (path / "tokenizer_config.json").exists():
            if not (path / "spiece.model").exists():
                raise ValueError(f"{path}: no tokenizer_config.json, tokenizer.json or spiece.model in this folder")
            return Tokenizer(_t5_class().from_pretrained(str(path), extra_ids=NUM_SENTINELS), name)
        return Tokenizer(transformers.AutoTokenizer.from_pretrained(str(path)), name)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ValueError(f"{name}: no such tokenizer file or folder")
    try:
        return Tokenizer(transformers.AutoTokenizer.from_pretrained(name), name)
    except OSError as e:
        raise ValueError(f"cannot load tokenizer {name!r}: not a local folder, and the hub is unreachable or "
                         f"has no such tokenizer ({e})") from e


def _t5_class():
    """The fast T5 tokenizer class (named T5TokenizerFast before transformers 5)."""
    import transformers

    return getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer


# ----------------------------------------------------------------------------- training


def sentencepiece_lines(texts: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    """Lines of documents for SentencePiece training: it drops 'sentences' longer than
    max_sentence_length bytes, so long lines are cut at spaces."""
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                    character_coverage: float = 0.9999, max_sentences: int = 5_000_000,
                    num_threads: int | None = None, seed: int = 0) -> Tokenizer:
    """Train a SentencePiece unigram tokenizer with T5's conventions and save it to `out_dir`.

    vocab_size counts SentencePiece pieces (T5: 32000); 100 sentinels come on top (T5: 32100 in all),
    `<extra_id_0>` = vocab_size + 99. Normalization is nmt_nfkc like T5's vocabulary; no byte fallback
    (T5 tokenizers in transformers never use it), so characters outside `character_coverage` of the
    training text become unk. The folder holds spiece.model, tokenizer.json and tokenizer_config.json.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "spiece.model"
    spm.set_random_generator_seed(seed)  # input sampling and shuffling are seeded
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "spiece"
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentencepiece_lines(texts),
            model_prefix=str(prefix),
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        shutil.copy(prefix.with_suffix(".model"), model_path)
    hf = _t5_class().from_pretrained(str(out), extra_ids=NUM_SENTINELS, model_max_length=512)
    hf.save_pretrained(str(out))  # adds tokenizer.json + tokenizer_config.json
    return load_tokenizer(out)


def tokenizer_main(argv: list[str]) -> int:
    """`nanot5 tokenizer train source=SPEC vocab_size=N out=DIR [max_docs=K]` (or --source SPEC ... flags)."""
    parser = argparse.ArgumentParser(prog="nanot5 tokenizer", description="Train a T5-style tokenizer.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="train a SentencePiece unigram tokenizer with T5 conventions")
    p.add_argument("--source", required=True, help="c4, hf:NAME[:CONFIG][:SPLIT], demo, or local files/glob")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="SentencePiece pieces (T5: 32000); 100 sentinels are added on top")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-docs", type=int, default=1_000_000, help="read at most this many documents")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--txt-mode", choices=["paragraph", "line"], default="paragraph")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--max-sentences", type=int, default=5_000_000, help="lines sampled for training")
    from nanot5.cliargs import kv_to_flags

    args = parser.parse_args(kv_to_flags(argv))

    from nanot5.data.sources import open_source

    source = open_source(args.source, split=args.split, text_column=args.text_column,
                         txt_mode=args.txt_mode, on_error=args.on_error)
    counts = {"docs": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for text in source:
            if counts["docs"] >= args.max_docs:
                return
            counts["docs"] += 1
            counts["chars"] += len(text)
            if counts["docs"] % 10000 == 0:
                print(f"read {counts['docs']:,} documents ({counts['chars'] / 1e6:.1f}M chars)", flush=True)
            yield text

    t0 = time.time()
    tok = train_tokenizer(texts(), args.vocab_size, args.out, character_coverage=args.character_coverage,
                          max_sentences=args.max_sentences)
    source.log_skipped()
    print(f"trained on {counts['docs']:,} documents ({counts['chars'] / 1e6:.1f}M chars) in "
          f"{time.time() - t0:.0f}s: {tok} -> {args.out}")
    return 0
