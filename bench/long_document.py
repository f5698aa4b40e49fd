"""Peak memory of one huge single-line document through the pre-training pipeline (issue 11).

A 50 MB document on one JSON line is read, tokenized and cut into span-corrupted windows by
`PretrainLoader`; we report the process's peak resident memory above what it held before the first batch.
The Rust tokenizer needs ~100 bytes per input character when it encodes a text whole (per-byte alignments,
per-token strings and offsets): ~5 GB for this document. nanot5 tokenizes long texts in bounded pieces.

    python bench/long_document.py [--mb 50] [--whole]     # --whole: encode in one call, for comparison

Prints one line: MB of text, tokens, peak extra MiB, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nanot5.data.tokenizer as tokenizer_module  # noqa: E402
from nanot5.data.loader import PretrainLoader  # noqa: E402

T5_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "t5-tokenizer")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50.0, help="document size in MB (default 50)")
    p.add_argument("--whole", action="store_true", help="tokenize the document in one call (no pieces)")
    args = p.parse_args()
    if args.whole:
        tokenizer_module.PIECE_CHARS = 10 ** 12
    words = ("the quick brown fox jumps over a lazy dog while nanot5 reads one very long line of text "
             "written without a single newline from start to end").split()
    rng = random.Random(0)
    n_chars = int(args.mb * 1e6)
    parts, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        parts.append(w)
        size += len(w) + 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "long.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"text": " ".join(parts)}) + "\n")
        del parts
        tok = tokenizer_module.load_tokenizer(T5_TOKENIZER)
        tok.encode_batch(["warm up"])
        base = peak_mib()
        t0 = time.time()
        loader = PretrainLoader(path, tok, input_length=512, batch_size=8, num_workers=0, shuffle_buffer=0,
                                infinite=False, max_batches=4)
        batches = list(loader)
        seconds = time.time() - t0
    print(f"document {args.mb:.0f} MB ({'whole' if args.whole else 'in pieces'}): {len(batches)} batches of "
          f"{tuple(batches[0]['input_ids'].shape)}, peak extra memory {peak_mib() - base:.0f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
