"""Pre-training batches: documents -> tokens -> raw windows -> shuffle -> T5 span corruption (or UL2's denoisers).

The stream is cut into R *logical readers* (`num_readers`), a number fixed for a run and independent of
how many processes and DataLoader workers read it. Reader j reads documents j, j+R, j+2R, ...
(`source.documents(j, R)`), turns them into a token stream (EOS after every document, as nanoT5 and T5
do), cuts it into raw windows, shuffles them in fixed *blocks* of `shuffle_buffer` windows with a
permutation seeded by (seed, j, block), and emits *sub-batches* of S = global_batch / R windows, each
span-corrupted with a generator seeded by (seed, j, sub-batch index). Nothing depends on the rank or
the worker, so:

    global micro-batch t = [reader 0's t-th sub-batch, reader 1's, ..., reader R-1's]   (global_batch rows)
    rank r of W          = the contiguous readers [r*R/W, (r+1)*R/W)                    (batch_size rows)
    worker w of a rank   = a contiguous group of the rank's readers; the main process joins one output of
                           every worker per step, in worker order, so the rank batch is in reader order.

The global batch at step t is therefore the same rows in the same order for any world size and any
number of workers, which is what makes N-process training equal 1-process training, and lets a
checkpoint written by N ranks resume on M ranks (`load_resharded_state`).

Why blocks instead of a streaming shuffle buffer: a block is a pure function of where it starts (a
document position and a token offset into that document), so the whole state of a reader is a few
integers: that start, the block index, how many windows of the block were already emitted and the
sub-batch counter. Resuming re-reads one block (at most shuffle_buffer windows) per reader and lands on
exactly the sub-batch the uninterrupted stream would have produced next.

Objectives (denoisers.py): with span corruption every window has one raw length. With UL2's mixture of
denoisers (or prefix LM) each denoiser needs its own raw length, so the denoiser of every window of a block is
drawn first, from a generator seeded by (seed, j, block), in stream order: the block is then cut into windows
of those lengths, shuffled with its windows' denoisers, and each sub-batch applies every window's own denoiser
(rows of a denoiser together, vectorised; targets padded with -100 to the mixture's widest target). A block is
still a pure function of where it starts, so the state, the resume and the layout guarantees are unchanged.

The tail of an epoch shorter than a window is dropped; the next epoch starts a new pass over the same
documents (reshuffled, since block indices keep counting). In a finite pass (evaluation) a reader's last
sub-batch may be short and readers may run out at different steps: a step then holds the rows of the
readers that still have some, which keeps "union over ranks = the single-process batch".
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from nanot5 import faults
from nanot5.data.denoisers import (
    DEFAULT_UL2_MIXTURE,
    OBJECTIVES,
    Denoiser,
    Mixture,
    mode_token_ids,
)
from nanot5.data.sources import DataError, Source, open_source
from nanot5.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("nanot5.data")

DEFAULT_SHUFFLE_WINDOWS = 8192  # per reader, ~4.7M tokens at raw_length 568: about nanoT5's 10k-document buffer
MIN_BLOCK_WINDOWS = 64  # without a shuffle, blocks only bound what a resume re-reads: keep them from being tiny
STATE_VERSION = 2  # 2: per logical reader ({reader_id: state}) and a global step; 1 was per (rank, worker)
PER_RANK_KEYS = ("batch_size", "rank", "world_size")  # may change between runs when resharding


Batch = tuple[np.ndarray, np.ndarray]  # (inputs (B, input_length), targets (B, target_length))
Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # a block's (tokens, window starts, window denoisers) slice


def _initial_state() -> dict:
    # epoch; pos/offset: where the current block starts (document position, tokens of it already used;
    # pos None = start of the epoch); block: blocks started by this reader; taken: windows of the current
    # block already emitted; batch: sub-batches emitted by this reader.
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
    """Everything a logical reader needs to produce sub-batches; picklable, shared with worker processes."""

    def __init__(self, source: Source, tokenizer: Tokenizer, *, num_readers: int, mixture: Mixture,
                 sub_batch: int, seed: int, shuffle_buffer: int, infinite: bool, docs_per_chunk: int):
        self.source, self.tokenizer, self.num_readers = source, tokenizer, num_readers
        self.mixture, self.sub_batch = mixture, sub_batch
        self.seed, self.shuffle_buffer, self.infinite = seed, shuffle_buffer, infinite
        self.docs_per_chunk = docs_per_chunk
        # without a shuffle the window order does not depend on the block size: blocks only bound a resume
        self.block_windows = shuffle_buffer if shuffle_buffer > 0 else max(sub_batch, MIN_BLOCK_WINDOWS)

    def sub_batches(self, reader_id: int, state: dict) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        """Reader `reader_id`'s stream from `state`: yield (inputs (S, input_length), targets (S, target_length),
        the reader's state after this sub-batch). The last sub-batch of a finite stream may have fewer rows."""
        S, R, N = self.sub_batch, self.num_readers, self.block_windows
        st = dict(state)
        cur = {k: st[k] for k in ("epoch", "pos", "offset", "block")}
        taken, nbatch = st["taken"], st["batch"]
        stream, windows_this_epoch = None, 0
        pending: list[Part] = []  # windows waiting for a full sub-batch
        pending_n = 0
        while True:
            if stream is None:
                windows_this_epoch = 0 if cur["pos"] is None else -1  # -1: resumed mid-epoch, unknown
                stream = _TokenStream(self.source, self.tokenizer, reader_id, R, cur["pos"], cur["offset"],
                                      self.docs_per_chunk)
            # the denoiser of each window of the block, in stream order, decides how long the window is
            kinds = self.mixture.draw(np.random.default_rng([self.seed, reader_id, 2, cur["block"]]), N)  # (N,)
            lengths = self.mixture.raw_lengths[kinds]  # (N,)
            ends = np.cumsum(lengths)  # (N,)
            tokens = stream.take(int(ends[-1]))
            nwin = int(np.searchsorted(ends, len(tokens), side="right"))  # whole windows in the block
            kinds, starts = kinds[:nwin], ends[:nwin] - lengths[:nwin]  # (nwin,) each
            if self.shuffle_buffer > 0:
                perm_rng = np.random.default_rng([self.seed, reader_id, 0, cur["block"]])
                order = perm_rng.permutation(nwin)
                kinds, starts = kinds[order], starts[order]
            if len(tokens) < ends[-1]:  # the reader's documents ran out: epoch over
                nxt = {"epoch": cur["epoch"] + 1, "pos": None, "offset": 0, "block": cur["block"] + 1}
                if windows_this_epoch == 0 and nwin == 0:
                    raise DataError(f"{self.source.name}: reader {reader_id} of {R} got less than one window "
                                    f"({lengths[0]} tokens) from a whole epoch; use more data, fewer readers "
                                    "(num_readers) or a shorter input_length")
                self.source.log_skipped()
                stream = None
            else:
                pos, off = stream.cursor()
                nxt = {"epoch": cur["epoch"], "pos": pos, "offset": off, "block": cur["block"] + 1}
            if windows_this_epoch >= 0:
                windows_this_epoch += nwin
            i = taken
            while i < nwin:
                k = min(S - pending_n, nwin - i)
                pending.append((tokens, starts[i:i + k], kinds[i:i + k]))
                pending_n += k
                i += k
                if pending_n == S:
                    after = {**cur, "taken": i} if i < nwin else {**nxt, "taken": 0}
                    yield self._denoise(pending, reader_id, nbatch) + ({**after, "batch": nbatch + 1},)
                    nbatch += 1
                    pending, pending_n = [], 0
            cur, taken = nxt, 0
            if stream is None and not self.infinite:
                if pending_n:  # the short last sub-batch of a finite stream
                    yield self._denoise(pending, reader_id, nbatch) + ({**cur, "taken": 0, "batch": nbatch + 1},)
                return

    def _denoise(self, parts: list[Part], reader_id: int, batch_index: int) -> Batch:
        """Cut the sub-batch's windows out of their blocks, rows of one denoiser together, and denoise them."""
        kinds = np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]  # (S,)
        windows = {}  # denoiser -> (rows, its raw length)
        for k in (np.unique(kinds).tolist() if len(self.mixture) > 1 else [0]):
            span = np.arange(self.mixture.raw_lengths[k])
            rows = [tok[(starts if len(self.mixture) == 1 else starts[kk == k])[:, None] + span]
                    for tok, starts, kk in parts]
            windows[k] = np.concatenate(rows) if len(rows) > 1 else rows[0]
        rng = np.random.default_rng([self.seed, reader_id, 1, batch_index])
        return self.mixture.apply(kinds, windows, rng)

    def steps(self, reader_ids: Sequence[int], states: dict[int, dict]
              ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, dict]]]:
        """Per step, the readers' next sub-batches joined in reader order, and their states after it.

        A reader that ran out (finite mode) adds nothing; the stream ends when all of them have."""
        streams = {j: self.sub_batches(j, states[j]) for j in reader_ids}
        while streams:
            inputs, targets, after = [], [], {}
            for j in list(streams):
                try:
                    x, y, after[j] = next(streams[j])
                except StopIteration:
                    del streams[j]
                    continue
                inputs.append(x)
                targets.append(y)
            if not inputs:
                return
            if len(inputs) == 1:
                yield inputs[0], targets[0], after
            else:
                yield np.concatenate(inputs), np.concatenate(targets), after


def _to_batch(inputs: np.ndarray, targets: np.ndarray) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(inputs.astype(np.int64)),
            "labels": torch.from_numpy(targets.astype(np.int64))}


class _WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker w runs the readers groups[w] from their saved states and yields, per step, their
    joined sub-batches tagged with (worker, step, states after it); then, in a finite pass, one 'done'."""

    def __init__(self, pipeline: _Pipeline, groups: list[list[int]], states: dict[int, dict], step: int):
        super().__init__()
        self.pipeline, self.groups, self.states, self.step = pipeline, groups, states, step

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        step = self.step
        for inputs, targets, after in self.pipeline.steps(self.groups[w], self.states):
            batch = _to_batch(inputs, targets)
            batch["_meta"] = {"worker": w, "step": step, "states": after, "done": False,
                              "skipped": dict(self.pipeline.source.skipped)}
            yield batch
            step += 1
        yield {"_meta": {"worker": w, "step": step, "done": True, "skipped": dict(self.pipeline.source.skipped)}}


def _identity(x):
    return x


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ends when the training process dies, even by SIGKILL.
    torch's own watchdog records the worker's parent only after this function, so a parent killed while
    its workers start would leave them waiting forever (and holding the parent's stdout/stderr open).
    Linux: the kernel kills the worker when its parent goes (prctl PR_SET_PDEATHSIG); everywhere: a worker
    whose parent is already gone exits at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG (linux/prctl.h)
    if os.getppid() != parent:
        os._exit(0)


class PretrainLoader:
    """An iterable of span-corrupted (or UL2-denoised) pre-training batches
    `{"input_ids": (B, input_length), "labels": (B, target_length)}` (torch.long), deterministic from
    `seed`, and the same global stream for any number of ranks and workers (see the module docstring);
    resumable with `state_dict()`/`load_state_dict()`, and across world sizes with `load_resharded_state()`.

    source: a spec for `open_source` ('c4', 'hf:...', 'demo', local files) or a Source.
    tokenizer: a name/path for `load_tokenizer` or a Tokenizer.
    objective: 'span' (T5 span corruption with noise_density and mean_noise_span_length), 'ul2' (UL2's mixture
        of denoisers, `mixture`) or 'prefix_lm' (T5's prefix LM: the target is the continuation, as long as
        the input). See denoisers.py; labels are -100 past a row's own target.
    mixture: objective='ul2' only: a mixture string 'R:3:0.15:0.2,...,S:0.5:0.2' or Denoisers (default: the
        UL2 paper's seven denoisers, denoisers.DEFAULT_UL2_MIXTURE).
    mode_tokens: objective='ul2' only: prepend the mode tokens [NLU]/[NLG]/[S2S] to the inputs; the
        tokenizer must have them (`denoisers.add_mode_tokens`).
    batch_size: rows per batch on this rank (the per-rank micro-batch); the global micro-batch is
        batch_size * world_size.
    num_readers: logical readers R; the stream depends on R, never on world_size or num_workers, so keep R
        fixed for a run (default world_size * max(1, num_workers)). R must be a multiple of world_size,
        batch_size a multiple of R / world_size, and R / world_size a multiple of num_workers.
    shuffle_buffer: windows each reader shuffles together (0: keep document order).
    infinite: loop over epochs forever (training); False: one pass, and every `iter()` starts again
        from the beginning with identical batches (evaluation; max_batches caps it).
    """

    def __init__(self, source: str | Source, tokenizer: str | Tokenizer, *, input_length: int = 512,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, batch_size: int = 128,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 num_readers: int | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_WINDOWS,
                 split: str = "train", text_column: str = "text", txt_mode: str = "paragraph",
                 on_error: str = "raise", infinite: bool = True, max_batches: int | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, docs_per_chunk: int = 256,
                 objective: str = "span", mixture: str | Sequence[Denoiser] | None = None, mode_tokens: bool = True):
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0 or seed < 0 or docs_per_chunk < 1:
            raise ValueError("batch_size and docs_per_chunk must be >= 1; num_workers, shuffle_buffer, seed >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        R = world_size * max(1, num_workers) if num_readers is None else num_readers
        self.readers = _reader_layout(R, rank=rank, world_size=world_size, batch_size=batch_size,
                                      num_workers=num_workers)
        self.source = source if isinstance(source, Source) else open_source(
            source, split=split, text_column=text_column, txt_mode=txt_mode, on_error=on_error)
        self.tokenizer = load_tokenizer(tokenizer)
        self.input_length = input_length
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        if objective == "span":
            denoisers = [Denoiser("R", noise_density, mean_noise_span_length)]
        elif objective == "prefix_lm":
            denoisers = [Denoiser("S", 0.5)]  # T5's prefix_lm: noise_density 0.5
        else:
            denoisers = DEFAULT_UL2_MIXTURE if mixture is None else mixture
        self.mode_tokens = objective == "ul2" and mode_tokens
        mode_ids = mode_token_ids(self.tokenizer) if self.mode_tokens else None
        s0 = self.tokenizer.sentinel_id(0) if objective != "prefix_lm" else -1
        self.mixture = Mixture(denoisers, input_length=input_length, sentinel_id=s0, eos_id=self.tokenizer.eos_id,
                               mode_ids=mode_ids)
        num_spans = max(self.mixture.num_spans)
        # T5's noise_span_to_unique_sentinel continues below the last sentinel into ordinary pieces; UL2's
        # X:3:0.5 needs that at 512 tokens, so mixtures may, plain span corruption may not
        checked = num_spans if objective == "span" else min(num_spans, self.tokenizer.num_sentinels)
        if any(self.tokenizer.sentinel_id(k) != s0 - k for k in range(checked)):  # also checks they exist
            raise ValueError(f"tokenizer {self.tokenizer.name!r}: span corruption needs sentinels "
                             f"<extra_id_k> = {s0} - k for k < {num_spans}")
        if num_spans > checked:
            log.warning("a denoiser of mixture %s needs %d sentinels per row, the tokenizer has %d: as in T5, the "
                        "ids after <extra_id_%d> (%d) continue down into ordinary vocabulary pieces",
                        self.mixture.spec, num_spans, checked, checked - 1, s0 - checked + 1)
        raw_lengths = set(self.mixture.raw_lengths.tolist())
        self.raw_length = raw_lengths.pop() if len(raw_lengths) == 1 else None  # None: one per denoiser
        self.target_length = self.mixture.target_length
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_readers, self.num_workers = R, num_workers
        self.shuffle_buffer, self.infinite = shuffle_buffer, infinite
        self.max_batches, self.pin_memory, self.prefetch_factor = max_batches, pin_memory, prefetch_factor
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self._pipeline = _Pipeline(self.source, self.tokenizer, num_readers=R, mixture=self.mixture,
                                   sub_batch=batch_size // len(self.readers), seed=seed,
                                   shuffle_buffer=shuffle_buffer, infinite=infinite, docs_per_chunk=docs_per_chunk)
        self._states = {j: _initial_state() for j in self.readers}  # this rank's readers, after the last batch
        self._step = 0  # global micro-batches consumed since the start of the stream
        self._skipped: dict[int, dict] = {}  # per worker process

    @property
    def epoch(self) -> int:
        """The epoch the slowest reader of this rank is in."""
        return min(s["epoch"] for s in self._states.values())

    @property
    def skipped(self) -> Counter:
        """Bad records skipped so far (on_error='skip'), by kind, over this rank's readers."""
        total = Counter(self.source.skipped) if self.num_workers == 0 else Counter()
        for counts in self._skipped.values():
            total.update(counts)
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.max_batches == 0:
            return
        if self.infinite:
            states, step = copy.deepcopy(self._states), self._step
        else:  # evaluation: always the same batches from the start
            states, step = {j: _initial_state() for j in self.readers}, 0
        # states advance just before each yield, i.e. exactly when a batch is handed over
        for n, (batch, after) in enumerate(self._produce(states, step), 1):
            if self.infinite:
                self._states.update(after)
                self._step += 1
            yield batch
            if self.max_batches is not None and n >= self.max_batches:
                return

    def _produce(self, states: dict[int, dict], step: int
                 ) -> Iterator[tuple[dict[str, torch.Tensor], dict[int, dict]]]:
        """Yield (this rank's batch, its readers' states after it), step after step."""
        if self.num_workers == 0:
            for inputs, targets, after in self._pipeline.steps(self.readers, states):
                yield self._pinned(_to_batch(inputs, targets)), after
            return
        # Worker processes must not fork a multi-threaded Rust tokenizer (and would oversubscribe cores).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        nw, per = self.num_workers, len(self.readers) // self.num_workers
        groups = [list(self.readers[w * per:(w + 1) * per]) for w in range(nw)]
        dataset = _WorkerDataset(self._pipeline, groups, states, step)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=nw, collate_fn=_identity,
                                             prefetch_factor=self.prefetch_factor,
                                             worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
        # DataLoader takes outputs from workers in turn; outputs are still grouped by their step tag, so a
        # step is complete once every worker sent its part or said it is done (finite passes only).
        pending: dict[int, dict[int, tuple[dict, dict]]] = {}  # step -> worker -> (batch, states)
        done: set[int] = set()
        items = iter(loader)  # starts the worker processes
        faults.point("workers")
        for item in items:
            meta = item.pop("_meta")
            w = meta["worker"]
            self._skipped[w] = meta["skipped"]
            if meta["done"]:
                done.add(w)
            else:
                pending.setdefault(meta["step"], {})[w] = (item, meta["states"])
            while all(v in pending.get(step, ()) or v in done for v in range(nw)):
                parts = [pending[step][v] for v in sorted(pending[step])] if step in pending else []
                if not parts:
                    return  # every worker is done
                del pending[step]
                if len(parts) == 1:
                    batch = parts[0][0]
                else:
                    batch = {k: torch.cat([p[0][k] for p in parts]) for k in ("input_ids", "labels")}
                after = {j: s for _, states_after in parts for j, s in states_after.items()}
                step += 1
                yield self._pinned(batch), after

    def _pinned(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pin_memory and torch.cuda.is_available():
            return {k: v.pin_memory() for k, v in batch.items()}
        return batch

    # ------------------------------------------------------------------------- checkpointing

    def _config(self) -> dict:
        # per-rank keys (PER_RANK_KEYS) before global_batch, so a changed batch_size is named as such
        if self.objective == "span":
            objective = {"noise_density": self.noise_density, "mean_noise_span_length": self.mean_noise_span_length}
        else:
            objective = {"mixture": self.mixture.spec, "mode_tokens": self.mode_tokens}
        return {"source": self.source.describe(), "input_length": self.input_length,
                "objective": self.objective, **objective, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
                "vocab_size": self.tokenizer.vocab_size,
                "num_readers": self.num_readers, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "global_batch": self.batch_size * self.world_size}

    def _check(self, state: dict, skip: tuple[str, ...] = ()) -> dict[int, dict]:
        """Check a state_dict against this loader's config; return its {reader_id: state}."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"loader state version {found!r} != {STATE_VERSION} (version 1 states, written "
                             "per rank and worker before logical readers, cannot be resumed)")
        saved = state["config"]
        hints = {"num_readers": f": build the loader with num_readers={saved.get('num_readers')!r}",
                 "global_batch": " (batch_size * world_size: the global micro-batch must not change)",
                 "world_size": ": resume with load_resharded_state(states of all ranks)",
                 "rank": ": load this rank's own state"}
        for key, now in self._config().items():
            # states written before objectives existed are span corruption
            if key not in skip and saved.get(key, "span" if key == "objective" else None) != now:
                raise ValueError(f"cannot resume data loader: {key} was {saved.get(key)!r} in the checkpoint, "
                                 f"now {now!r}{hints.get(key, '')}")
        return {int(j): s for j, s in state["readers"].items()}  # JSON turns int keys into strings

    def state_dict(self) -> dict:
        """Where the stream is after the batches consumed so far: this rank's readers' positions and the
        global step, no data. `{"version", "step", "readers": {reader_id: state}, "config"}`."""
        return {"version": STATE_VERSION, "step": self._step, "readers": copy.deepcopy(self._states),
                "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches consumed when `state` was taken. The loader must be built with
        the same source, tokenizer, lengths, seed, num_readers, batch size and rank layout (num_workers may
        differ: the stream does not depend on it)."""
        readers = self._check(state)
        if set(readers) != set(self.readers):
            raise ValueError(f"loader state holds readers {sorted(readers)}, this rank runs {list(self.readers)}")
        self._states = {j: copy.deepcopy(readers[j]) for j in self.readers}
        self._step = int(state["step"])

    def load_resharded_state(self, states: list[dict]) -> None:
        """Continue the stream saved by a run with another world size: `states` are the `state_dict()`s of
        ALL its ranks (any order). Same source, tokenizer, lengths, seed, num_readers and global micro-batch
        (batch_size * world_size) are required; this rank takes its own readers' states, so the global batch
        at every later step is the one the uninterrupted run would have produced."""
        if not states:
            raise ValueError("load_resharded_state needs the data states of every rank of the saved run, got none")
        merged: dict[int, dict] = {}
        steps = set()
        for i, state in enumerate(states):
            for j, s in self._check(state, skip=PER_RANK_KEYS).items():
                if j in merged:
                    raise ValueError(f"reader {j} is in two of the given states (state {i} repeats a rank)")
                merged[j] = s
            steps.add(int(state["step"]))
        if len(steps) != 1:
            raise ValueError(f"the ranks' data states are at different steps {sorted(steps)}: they were not "
                             "saved together")
        missing = sorted(set(range(self.num_readers)) - set(merged))
        if missing:
            raise ValueError(f"the given states lack readers {missing} of {self.num_readers}: pass the data "
                             "states of all ranks of the saved run")
        self._states = {j: copy.deepcopy(merged[j]) for j in self.readers}
        self._step = steps.pop()


def _reader_layout(num_readers: int, *, rank: int, world_size: int, batch_size: int,
                   num_workers: int) -> range:
    """This rank's logical readers, after checking that readers split evenly over ranks, rows and workers."""
    R = num_readers
    if R < 1:
        raise ValueError(f"num_readers must be >= 1, got {R}")
    if R % world_size:
        raise ValueError(f"num_readers={R} is not a multiple of world_size={world_size}: every rank must host "
                         "the same number of logical readers")
    local = R // world_size
    if batch_size % local:
        raise ValueError(f"batch_size={batch_size} (per rank) is not a multiple of num_readers / world_size = "
                         f"{R} / {world_size} = {local}: each reader gives batch_size * world_size / num_readers "
                         "rows per step")
    if num_workers and local % num_workers:
        raise ValueError(f"num_workers={num_workers} does not divide the {local} logical readers of a rank "
                         f"(num_readers={R} / world_size={world_size}): each worker hosts the same number")
    return range(rank * local, (rank + 1) * local)
