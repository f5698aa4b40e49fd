"""Pre-training batches: documents -> tokens -> raw windows -> shuffle -> T5 span corruption.

Each reader (one DataLoader worker of one rank, see sources.py) turns its share of the documents
into a token stream (EOS after every document, as nanoT5 and T5 do), cuts it into raw_length
windows, shuffles them in fixed *blocks* of `shuffle_buffer` windows with a permutation seeded by
(seed, reader, block), batches them and span-corrupts each batch with a generator seeded by
(seed, reader, batch index).

Why blocks instead of a streaming shuffle buffer: a block is a pure function of where it starts
(a document position and a token offset into that document), so the whole state of a reader is a
few integers: that start, the block index, how many windows of the block were already batched and
the batch counter. Resuming re-reads one block (at most shuffle_buffer windows) and lands on exactly
the batch the uninterrupted stream would have produced next. With worker processes, DataLoader
takes batches from workers round-robin; the loader records which worker produced each batch and
that worker's state after it, and on resume rotates the worker ids so the next batch again comes
from the worker whose turn it is.

The tail of an epoch shorter than a window is dropped; the next epoch starts a new pass over the
same documents (reshuffled, since block indices keep counting).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nanot5.data.sources import DataError, Source, open_source
from nanot5.data.span_corruption import compute_lengths, span_corrupt, span_counts
from nanot5.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("nanot5.data")

DEFAULT_SHUFFLE_WINDOWS = 8192  # ~4.7M tokens at raw_length 568: about nanoT5's 10k-document buffer
STATE_VERSION = 1


def _initial_state() -> dict:
    # epoch; pos/offset: where the current block starts (document position, tokens of it already used;
    # pos None = start of the epoch); block: blocks started by this reader; taken: windows of the current
    # block already batched; batch: batches produced by this reader.
    return {"epoch": 0, "pos": None, "offset": 0, "block": 0, "taken": 0, "batch": 0}


class _TokenStream:
    """Token ids of one reader's documents from a (position, offset) cursor, EOS after each document.

    Documents are tokenized `docs_per_chunk` at a time (one batched Rust call); a chunk keeps each
    document's position and cumulative end so `cursor()` can name the document of any token.
    """

    def __init__(self, source: Source, tokenizer: Tokenizer, reader_id: int, num_readers: int,
                 pos: Any, offset: int, docs_per_chunk: int):
        self._docs = source.documents(reader_id, num_readers, start=pos)
        self._tok = tokenizer
        self._docs_per_chunk = docs_per_chunk
        self._positions: list = []
        self._ends = np.zeros(0, np.int64)  # (docs,) cumulative token ends in the chunk
        self._tokens = np.zeros(0, np.int32)  # (tokens,)
        self._idx = 0  # next token in the chunk
        if self._next_chunk():
            if offset > self._ends[0]:
                raise DataError(f"resume offset {offset} is past the end of its document: the data changed")
            self._idx = offset

    def _next_chunk(self) -> bool:
        positions, texts = [], []
        for pos, text in self._docs:
            positions.append(pos)
            texts.append(text)
            if len(texts) == self._docs_per_chunk:
                break
        if not texts:
            return False
        ids = self._tok.encode_batch(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, count=len(ids))
        ends = np.cumsum(lengths)
        tokens = np.empty(int(ends[-1]), np.int32)
        is_eos = np.zeros(len(tokens), bool)
        is_eos[ends - 1] = True
        tokens[is_eos] = self._tok.eos_id
        tokens[~is_eos] = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=len(tokens) - len(ids))
        self._positions, self._ends, self._tokens, self._idx = positions, ends, tokens, 0
        return True

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (fewer only when the reader's documents run out)."""
        parts, need = [], n
        while need > 0:
            if self._idx == len(self._tokens) and not self._next_chunk():
                break
            k = min(need, len(self._tokens) - self._idx)
            parts.append(self._tokens[self._idx:self._idx + k])
            self._idx += k
            need -= k
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def cursor(self) -> tuple[Any, int]:
        """(position of the document holding the next token, tokens of it already taken)."""
        i = min(int(np.searchsorted(self._ends, self._idx, side="right")), len(self._ends) - 1)
        start = int(self._ends[i - 1]) if i else 0
        return self._positions[i], self._idx - start


class _Pipeline:
    """Everything a reader needs to produce batches; picklable, shared with worker processes."""

    def __init__(self, source: Source, tokenizer: Tokenizer, *, raw_length: int, batch_size: int,
                 noise_density: float, mean_noise_span_length: float, seed: int, shuffle_buffer: int,
                 infinite: bool, docs_per_chunk: int):
        self.source, self.tokenizer = source, tokenizer
        self.raw_length, self.batch_size = raw_length, batch_size
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.seed, self.shuffle_buffer, self.infinite = seed, shuffle_buffer, infinite
        self.docs_per_chunk = docs_per_chunk
        self.sentinel_id = tokenizer.sentinel_id(0)
        # without a shuffle, blocks only bound how much is re-read on resume
        self.block_windows = shuffle_buffer if shuffle_buffer > 0 else batch_size

    def batches(self, reader_id: int, num_readers: int, state: dict
                ) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        """Yield (inputs (B, input_length), targets (B, target_length), state after this batch).

        The last batch of a finite stream may have fewer rows."""
        raw, B = self.raw_length, self.batch_size
        st = dict(state)
        cur = {k: st[k] for k in ("epoch", "pos", "offset", "block")}
        taken, nbatch = st["taken"], st["batch"]
        stream, windows_this_epoch = None, 0
        pending: list[np.ndarray] = []  # windows waiting for a full batch
        pending_n = 0
        while True:
            if stream is None:
                windows_this_epoch = 0 if cur["pos"] is None else -1  # -1: resumed mid-epoch, unknown
                stream = _TokenStream(self.source, self.tokenizer, reader_id, num_readers, cur["pos"],
                                      cur["offset"], self.docs_per_chunk)
            tokens = stream.take(self.block_windows * raw)
            nwin = len(tokens) // raw
            windows = tokens[: nwin * raw].reshape(nwin, raw)  # (nwin, raw)
            if self.shuffle_buffer > 0:
                perm_rng = np.random.default_rng([self.seed, reader_id, 0, cur["block"]])
                windows = windows[perm_rng.permutation(nwin)]
            if len(tokens) < self.block_windows * raw:  # the reader's documents ran out: epoch over
                nxt = {"epoch": cur["epoch"] + 1, "pos": None, "offset": 0, "block": cur["block"] + 1}
                if windows_this_epoch == 0 and nwin == 0:
                    raise DataError(f"{self.source.name}: reader {reader_id} of {num_readers} got less than one "
                                    f"window ({raw} tokens) from a whole epoch; use more data, fewer workers/ranks "
                                    "or a shorter input_length")
                self.source.log_skipped()
                stream = None
            else:
                pos, off = stream.cursor()
                nxt = {"epoch": cur["epoch"], "pos": pos, "offset": off, "block": cur["block"] + 1}
            if windows_this_epoch >= 0:
                windows_this_epoch += nwin
            i = taken
            while i < nwin:
                k = min(B - pending_n, nwin - i)
                pending.append(windows[i:i + k])
                pending_n += k
                i += k
                if pending_n == B:
                    after = {**cur, "taken": i} if i < nwin else {**nxt, "taken": 0}
                    yield self._corrupt(np.concatenate(pending), reader_id, nbatch) + ({**after, "batch": nbatch + 1},)
                    nbatch += 1
                    pending, pending_n = [], 0
            cur, taken = nxt, 0
            if stream is None and not self.infinite:
                if pending_n:  # the short last batch of a finite stream
                    yield self._corrupt(np.concatenate(pending), reader_id, nbatch) + (
                        {**cur, "taken": 0, "batch": nbatch + 1},)
                return

    def _corrupt(self, windows: np.ndarray, reader_id: int, batch_index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, reader_id, 1, batch_index])
        return span_corrupt(windows, noise_density=self.noise_density,
                            mean_noise_span_length=self.mean_noise_span_length,
                            sentinel_id=self.sentinel_id, eos_id=self.tokenizer.eos_id, rng=rng)


def _to_batch(inputs: np.ndarray, targets: np.ndarray) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(inputs.astype(np.int64)),
            "labels": torch.from_numpy(targets.astype(np.int64))}


class _WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker w runs logical reader (w + rotation) % num_workers from its saved state."""

    def __init__(self, pipeline: _Pipeline, states: list[dict], rank: int, world_size: int, rotation: int):
        super().__init__()
        self.pipeline, self.states, self.rank, self.world_size = pipeline, states, rank, world_size
        self.rotation = rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        num_workers = len(self.states)
        w = (info.id + self.rotation) % num_workers
        reader_id, num_readers = self.rank * num_workers + w, self.world_size * num_workers
        for inputs, targets, state in self.pipeline.batches(reader_id, num_readers, self.states[w]):
            batch = _to_batch(inputs, targets)
            batch["_meta"] = {"worker": w, "state": state, "skipped": dict(self.pipeline.source.skipped)}
            yield batch


def _identity(x):
    return x


class PretrainLoader:
    """An iterable of span-corrupted pre-training batches
    `{"input_ids": (B, input_length), "labels": (B, target_length)}` (torch.long), deterministic from
    `seed`, sharded over ranks and workers, resumable with `state_dict()`/`load_state_dict()`.

    source: a spec for `open_source` ('c4', 'hf:...', 'demo', local files) or a Source.
    tokenizer: a name/path for `load_tokenizer` or a Tokenizer.
    batch_size: rows per batch on this rank.
    shuffle_buffer: windows shuffled together (0: keep document order).
    infinite: loop over epochs forever (training); False: one pass, and every `iter()` starts again
        from the beginning with identical batches (evaluation; max_batches caps it).
    """

    def __init__(self, source: str | Source, tokenizer: str | Tokenizer, *, input_length: int = 512,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, batch_size: int = 128,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_WINDOWS, split: str = "train", text_column: str = "text",
                 txt_mode: str = "paragraph", on_error: str = "raise", infinite: bool = True,
                 max_batches: int | None = None, pin_memory: bool = False, prefetch_factor: int = 2,
                 docs_per_chunk: int = 256):
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0 or seed < 0 or docs_per_chunk < 1:
            raise ValueError("batch_size and docs_per_chunk must be >= 1; num_workers, shuffle_buffer, seed >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.source = source if isinstance(source, Source) else open_source(
            source, split=split, text_column=text_column, txt_mode=txt_mode, on_error=on_error)
        self.tokenizer = load_tokenizer(tokenizer)
        self.input_length = input_length
        self.raw_length, self.target_length = compute_lengths(input_length, noise_density, mean_noise_span_length)
        _, num_spans = span_counts(self.raw_length, noise_density, mean_noise_span_length)
        s0 = self.tokenizer.sentinel_id(0)
        if any(self.tokenizer.sentinel_id(k) != s0 - k for k in range(num_spans)):  # also checks they exist
            raise ValueError(f"tokenizer {self.tokenizer.name!r}: span corruption needs sentinels "
                             f"<extra_id_k> = {s0} - k for k < {num_spans}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.infinite = num_workers, shuffle_buffer, infinite
        self.max_batches, self.pin_memory, self.prefetch_factor = max_batches, pin_memory, prefetch_factor
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self._pipeline = _Pipeline(self.source, self.tokenizer, raw_length=self.raw_length, batch_size=batch_size,
                                   noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
                                   seed=seed, shuffle_buffer=shuffle_buffer, infinite=infinite,
                                   docs_per_chunk=docs_per_chunk)
        self._states = [_initial_state() for _ in range(max(1, num_workers))]
        self._batches = 0  # batches yielded (and so consumed) since the start of the stream
        self._skipped: dict[int, dict] = {}

    @property
    def epoch(self) -> int:
        """The epoch the slowest reader of this rank is in."""
        return min(s["epoch"] for s in self._states)

    @property
    def skipped(self) -> Counter:
        """Bad records skipped so far (on_error='skip'), by kind, over this rank's readers."""
        total = Counter(self.source.skipped) if self.num_workers == 0 else Counter()
        for counts in self._skipped.values():
            total.update(counts)
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.infinite:
            states, rotation = self._states, self._batches
        else:  # evaluation: always the same batches from the start
            states, rotation = [_initial_state() for _ in self._states], 0
        if self.max_batches == 0:
            return
        # states advance inside _produce just before each yield, i.e. exactly when a batch is handed over
        for n, batch in enumerate(self._produce(states, rotation), 1):
            if self.infinite:
                self._batches += 1
            yield batch
            if self.max_batches is not None and n >= self.max_batches:
                return

    def _produce(self, states: list[dict], rotation: int) -> Iterator[dict[str, torch.Tensor]]:
        W = len(states)
        if self.num_workers == 0:
            for inputs, targets, state in self._pipeline.batches(self.rank, self.world_size, states[0]):
                states[0] = state
                yield _to_batch(inputs, targets)
            return
        # Worker processes must not fork a multi-threaded Rust tokenizer (and would oversubscribe cores).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        dataset = _WorkerDataset(self._pipeline, copy.deepcopy(states), self.rank, self.world_size, rotation % W)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, pin_memory=self.pin_memory,
                                             prefetch_factor=self.prefetch_factor)
        for batch in loader:
            meta = batch.pop("_meta")
            states[meta["worker"]] = meta["state"]
            self._skipped[meta["worker"]] = meta["skipped"]
            yield batch

    # ------------------------------------------------------------------------- checkpointing

    def _config(self) -> dict:
        return {"source": self.source.describe(), "input_length": self.input_length,
                "noise_density": self.noise_density, "mean_noise_span_length": self.mean_noise_span_length,
                "batch_size": self.batch_size, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "shuffle_buffer": self.shuffle_buffer, "vocab_size": self.tokenizer.vocab_size}

    def state_dict(self) -> dict:
        """Where the stream is after the batches consumed so far: positions and counters, no data."""
        return {"version": STATE_VERSION, "batches": self._batches, "workers": copy.deepcopy(self._states),
                "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches consumed when `state` was taken. The loader must be built
        with the same source, tokenizer, lengths, batch size, seed, ranks and workers."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} != {STATE_VERSION}")
        saved, ours = state["config"], self._config()
        for key in ours:
            if saved.get(key) != ours[key]:
                raise ValueError(f"cannot resume data loader: {key} was {saved.get(key)!r} in the checkpoint, "
                                 f"now {ours[key]!r}")
        self._states = copy.deepcopy(list(state["workers"]))
        self._batches = int(state["batches"])
