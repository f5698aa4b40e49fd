"""Fine-tuning batches: tokenized (input, target) examples -> padded, length-grouped or packed batches.

Shared by Super-Natural Instructions (nanot5/data/sni.py) and any seq2seq data (nanot5/data/seq2seq.py). An
*examples* object holds the tokenized data set and gives, for every epoch e, one input and one target token
sequence per example (`epoch(e)`): multi-reference data draws one reference per example and epoch, SNI in
Tk-Instruct mode also draws the prompt layout. Everything is a pure function of (seed, epoch), so a batch stream
resumes exactly from (epoch, batches consumed) and every rank computes the same global plan.

Batching modes (`data.batching`), for a global batch of G = batch_size x world_size examples:
- naive:   epoch-shuffled examples, G at a time; every row padded to the longest example of its batch (what
           nanoT5/Tk-Instruct do). Rank r takes the r-th slice of each global batch.
- grouped: the same shuffled examples cut into mega-batches of `group_size` global batches; each mega-batch is
           sorted by length and cut into global batches, whose order is then shuffled over the whole epoch.
           Examples of similar length share a batch (little padding) and batches still come in random order
           (the megabatch scheme of HF's LengthGroupedSampler / fairseq). Rank r takes examples r, r+W, ... of
           a global batch, so all ranks see the same length range.
- packed:  the naive global batches (same examples per optimizer step, same number of steps per epoch, so the
           same optimisation as naive), but each rank packs its batch_size examples into rows of at most
           `max_seq_len` input and `max_target_len` target tokens: as few rows as first-fit decreasing needs, or
           a few more, evenly filled, when shorter rows are cheaper (`pack_rows`). Rows carry segment ids (1..k
           for the k examples of a row, 0 on padding) so the model can attend within an example only; the loss is
           the mean over all target tokens of the batch, as unpacked.
           We pack a fixed number of EXAMPLES per batch rather than a fixed number of rows or a token budget:
           rows or token budgets would change how many examples an optimizer step sees, i.e. the learning rate
           and batch size the user chose.

The default is grouped (data.batching in nanot5/config.py). Measured with bench/finetune.py on the SNI subset in
tests/data (train tasks, Tk-Instruct prompts, t5-v1_1-small shape, bf16, forward+backward, a shared 2-core CPU):
padding falls from 33% (naive) to 9-10% (grouped) and 11-12% (packed) at batch 8; naive/mode FLOPs on the padded
shapes are 1.34-1.37x (grouped) and 1.31x (packed) at batch 8, 1.44-1.54x and 1.40x at batch 32; timed, grouped
trained 1.2-1.5x and packed 1.16-1.28x naive's target tokens/s (noisy: other jobs shared the cores). Grouped needs
nothing from the model and its rows are each as short as their examples; packed keeps naive's random batch
composition but needs a segment-aware model, and its longer rows make attention (memory-bound on CPU) dearer.

Batch keys (torch.long tensors; S, T rounded up to a multiple of `pad_to_multiple_of`):
    padded: input_ids (B, S) padded with pad_id, attention_mask (B, S), labels (B, T) padded with -100
    packed: input_ids (R, S), encoder_segment_ids (R, S), labels (R, T), decoder_segment_ids (R, T),
            decoder_input_ids (R, T): per example [decoder_start] + its labels[:-1], pad elsewhere (what
            `T5.shift_right` gives each example alone; the model may also derive it from labels + segment ids)
    both:   index: list of example indices (packed: row by row, segment by segment)
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from nanot5.data import LABEL_PAD
from nanot5.errors import DataError

BATCHING = ("naive", "grouped", "packed")
GROUP_SIZE = 64  # global batches per length-sorted mega-batch (grouped mode); HF's LengthGroupedSampler uses 50
# Row length at which attention costs as much per token as the rest of a T5 layer (see `pack_cost`). By FLOPs it
# is ~3000-6000 tokens for T5 v1.1 small-large (forward per token: 8 d*inner + 6 d*d_ff in projections and MLP,
# 4 inner per attended key), but on CPU (t5-v1_1-small, bf16 autocast, forward+backward, 2 cores) a position of a
# 1024-token row cost 1.6-2x one of a 216-token row: softmax, masks and position biases are memory-bound, which
# puts it at ~600-1100 tokens. We use 1024; a GPU with fused attention is nearer the FLOP count.
PACK_ATTENTION_TOKENS = 1024


class Examples(Protocol):
    """What the batchers need: a length and one (inputs, targets) token-id list pair per epoch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]: ...


# ---------------------------------------------------------------------------------------------------- tokenizing


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, chunk: int = 1024
                 ) -> tuple[list[np.ndarray], list[int]]:
    """Token ids (int32) of texts with the tokenizer's special tokens, cut to `max_length` as HF cuts them.

    Returns (ids, full_lengths): the untruncated length of each text, so callers can count truncations. The cut
    keeps the trailing special tokens (T5: `</s>`), which is what `tokenizer(text, max_length=L,
    truncation=True)` gives for T5-family tokenizers, whose only special token is that suffix.
    `tokenizer` is a `transformers` tokenizer or nanot5's Tokenizer (its `.hf` is used).
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    suffix = hf.num_special_tokens_to_add()
    if max_length <= suffix:
        raise ValueError(f"max_length={max_length} leaves no room for text besides {suffix} special token(s)")
    out: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        for ids in hf(list(texts[start:start + chunk]))["input_ids"]:
            lengths.append(len(ids))
            if len(ids) > max_length:
                ids = ids[:max_length - suffix] + ids[len(ids) - suffix:]
            out.append(np.asarray(ids, dtype=np.int32))
    return out, lengths


def draw_targets(references: Sequence[Sequence[np.ndarray]], seed: int, epoch: int) -> list[np.ndarray]:
    """One reference per example for this epoch: the only one, or one drawn with random.Random(f"{seed}:{epoch}").

    Multi-reference examples thus train on each of their answers over the epochs, as SNI's collator (after
    Tk-Instruct's `random.choice(outputs)`) does.
    """
    rng = random.Random(f"{seed}:{epoch}:targets")
    return [refs[0] if len(refs) == 1 else refs[rng.randrange(len(refs))] for refs in references]


class TokenizedExamples:
    """Tokenized examples with fixed inputs and one or more references each (see `draw_targets`).

    `stats` summarises tokenization for logging: examples, inputs_truncated, targets_truncated (references cut to
    the target limit), and the longest input/target before truncation.
    """

    def __init__(self, inputs: list[np.ndarray], references: list[list[np.ndarray]], *, seed: int = 0,
                 stats: dict[str, int] | None = None):
        if len(inputs) != len(references):
            raise ValueError(f"{len(inputs)} inputs for {len(references)} reference lists")
        if any(len(r) == 0 for r in references):
            raise ValueError("every example needs at least one reference")
        self.inputs, self.references, self.seed = inputs, references, seed
        self.stats = dict(stats or {})
        self._multi = any(len(r) > 1 for r in references)
        self._single = None if self._multi else [r[0] for r in references]
        self._drawn: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def epoch(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._single is not None:
            return self.inputs, self._single
        if self._drawn is None or self._drawn[0] != epoch:
            self._drawn = (epoch, draw_targets(self.references, self.seed, epoch))
        return self.inputs, self._drawn[1]


def encode_examples(tokenizer: Any, inputs: Sequence[str], references: Sequence[Sequence[str]], *,
                    max_seq_len: int, max_target_len: int, seed: int = 0) -> TokenizedExamples:
    """Tokenize input texts and their reference lists (each cut as `encode_texts` does), counting truncations."""
    in_ids, in_lens = encode_texts(tokenizer, inputs, max_seq_len)
    flat = [r for refs in references for r in refs]
    ref_ids, ref_lens = encode_texts(tokenizer, flat, max_target_len)
    grouped, k = [], 0
    for refs in references:
        grouped.append(ref_ids[k:k + len(refs)])
        k += len(refs)
    stats = {
        "examples": len(in_ids),
        "inputs_truncated": sum(n > max_seq_len for n in in_lens),
        "targets_truncated": sum(n > max_target_len for n in ref_lens),
        "max_input_tokens": max(in_lens, default=0),
        "max_target_tokens": max(ref_lens, default=0),
    }
    return TokenizedExamples(in_ids, grouped, seed=seed, stats=stats)


def truncation_message(stats: dict[str, int], *, max_seq_len: int, max_target_len: int, what: str = "") -> str:
    """One line for the log: how many inputs/targets were cut to data.max_seq_len / data.max_target_len."""
    n = stats.get("examples", 0)
    parts = []
    if stats.get("inputs_truncated"):
        parts.append(f"{stats['inputs_truncated']} of {n} inputs cut to data.max_seq_len={max_seq_len} "
                     f"(longest {stats['max_input_tokens']} tokens)")
    if stats.get("targets_truncated"):
        parts.append(f"{stats['targets_truncated']} targets cut to data.max_target_len={max_target_len} "
                     f"(longest {stats['max_target_tokens']} tokens)")
    prefix = f"{what}: " if what else ""
    return prefix + ("; ".join(parts) if parts else f"no input or target of the {n} examples was truncated")


# ---------------------------------------------------------------------------------------------------- collating


def _round_up(n: int, multiple: int | None) -> int:
    return (n + multiple - 1) // multiple * multiple if multiple else n


def collate_padded(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], *, pad_id: int,
                   pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """One row per example: input_ids/attention_mask (B, S) and labels (B, T), right-padded."""
    S = _round_up(max(len(x) for x in inputs), pad_to_multiple_of)
    T = _round_up(max(len(y) for y in targets), pad_to_multiple_of)
    ids = np.full((len(inputs), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(inputs), S), dtype=np.int64)
    labels = np.full((len(targets), T), LABEL_PAD, dtype=np.int64)
    for i, (x, y) in enumerate(zip(inputs, targets)):
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
        labels[i, :len(y)] = y
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def _first_fit(order: list[int], a: Sequence[int], b: Sequence[int], max_a: int, max_b: int) -> list[list[int]]:
    """First-fit: each example (in `order`) into the first row with room for its input and target."""
    rows: list[list[int]] = []
    room: list[list[int]] = []
    for i in order:
        for r, (ra, rb) in enumerate(room):
            if a[i] <= ra and b[i] <= rb:
                rows[r].append(i)
                room[r][0] -= a[i]
                room[r][1] -= b[i]
                break
        else:
            rows.append([i])
            room.append([max_a - a[i], max_b - b[i]])
    return rows


def _spread(order: list[int], a: Sequence[int], b: Sequence[int], max_a: int, max_b: int, n_rows: int
            ) -> list[list[int]] | None:
    """Longest-first onto the row with the fewest input tokens that has room (LPT, Graham 1969); None if stuck."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    heap = [(0, 0, r) for r in range(n_rows)]  # (input load, target load, row): least-filled first
    for i in order:
        skipped = []
        while heap and (heap[0][0] + a[i] > max_a or heap[0][1] + b[i] > max_b):
            if heap[0][0] + a[i] > max_a:  # the least input-filled row is too full: every row is
                heap = []
                break
            skipped.append(heapq.heappop(heap))  # no room for the target: try the next row
        if not heap:
            return None
        load_a, load_b, r = heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (load_a + a[i], load_b + b[i], r))
        for item in skipped:
            heapq.heappush(heap, item)
    return [row for row in rows if row]


def pack_cost(rows: list[list[int]], a: Sequence[int], b: Sequence[int], attention_tokens: float) -> float:
    """Estimated compute of a packed batch, in encoder-position units: R x (S x (1 + S / A) + 2 T).

    Every row is padded to the widest (S inputs, T targets). A position costs its projections and MLP (1) plus
    attention over S keys (S / A, A = `attention_tokens`, the row length at which attention costs as much as the
    rest); a target position about two encoder positions (self and cross attention, the vocabulary projection).
    """
    S = max(sum(a[i] for i in row) for row in rows)
    T = max(sum(b[i] for i in row) for row in rows)
    return len(rows) * (S * (1 + S / attention_tokens) + 2 * T)


def pack_rows(input_lengths: Sequence[int], target_lengths: Sequence[int], max_input: int, max_target: int,
              attention_tokens: float = PACK_ATTENTION_TOKENS) -> list[list[int]]:
    """Positions of the examples in each packed row, every row within both capacities.

    First-fit decreasing (longest input first) gives the fewest rows R0 that fit. Fewer, longer rows are not
    always cheaper: attention grows with the row length, and every row is padded to the longest. Rows cannot be
    shorter than the longest example L, which R1 = ceil(input tokens / L) evenly filled rows nearly reach. So the
    examples are also spread evenly (`_spread`) over R0, the midpoint, and R1-2 .. R1+2 rows, and the candidate
    with the lowest `pack_cost` is kept (the first-fit rows on a tie).
    """
    a, b = list(input_lengths), list(target_lengths)
    if max(a) > max_input or max(b) > max_target:
        raise ValueError(f"an example of {max(a)} input / {max(b)} target tokens exceeds the row size "
                         f"{max_input}/{max_target}")
    order = sorted(range(len(a)), key=lambda i: (-a[i], -b[i], i))
    best = _first_fit(order, a, b, max_input, max_target)
    best_cost = pack_cost(best, a, b, attention_tokens)
    r0 = len(best)
    r1 = -(-sum(a) // max(a))
    candidates = sorted({r0, (r0 + r1) // 2, *(r1 + d for d in range(-2, 3))})
    for n_rows in candidates:
        if not r0 <= n_rows <= len(a):
            continue
        rows = _spread(order, a, b, max_input, max_target, n_rows)
        if rows is not None:
            cost = pack_cost(rows, a, b, attention_tokens)
            if cost < best_cost:
                best, best_cost = rows, cost
    return best


def collate_packed(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], rows: list[list[int]], *,
                   pad_id: int, decoder_start_id: int = 0, pad_to_multiple_of: int | None = 8
                   ) -> dict[str, torch.Tensor]:
    """Rows of concatenated examples with segment ids (see the module docstring)."""
    S = _round_up(max(sum(len(inputs[i]) for i in row) for row in rows), pad_to_multiple_of)
    T = _round_up(max(sum(len(targets[i]) for i in row) for row in rows), pad_to_multiple_of)
    R = len(rows)
    ids = np.full((R, S), pad_id, dtype=np.int64)
    enc_seg = np.zeros((R, S), dtype=np.int64)
    labels = np.full((R, T), LABEL_PAD, dtype=np.int64)
    dec_in = np.full((R, T), pad_id, dtype=np.int64)
    dec_seg = np.zeros((R, T), dtype=np.int64)
    for r, row in enumerate(rows):
        s = t = 0
        for j, i in enumerate(row, start=1):
            x, y = inputs[i], targets[i]
            ids[r, s:s + len(x)] = x
            enc_seg[r, s:s + len(x)] = j
            labels[r, t:t + len(y)] = y
            dec_in[r, t] = decoder_start_id
            dec_in[r, t + 1:t + len(y)] = y[:-1]
            dec_seg[r, t:t + len(y)] = j
            s, t = s + len(x), t + len(y)
    return {"input_ids": torch.from_numpy(ids), "encoder_segment_ids": torch.from_numpy(enc_seg),
            "labels": torch.from_numpy(labels), "decoder_input_ids": torch.from_numpy(dec_in),
            "decoder_segment_ids": torch.from_numpy(dec_seg)}


def token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Real and total (padded) input and target positions of a batch, padded or packed."""
    mask = batch["encoder_segment_ids"] if "encoder_segment_ids" in batch else batch["attention_mask"]
    return {"input_tokens": int((mask > 0).sum()), "input_positions": mask.numel(),
            "target_tokens": int((batch["labels"] != LABEL_PAD).sum()), "target_positions": batch["labels"].numel()}


# ---------------------------------------------------------------------------------------------------- training


class Seq2SeqBatches:
    """Endless, epoch-shuffled training batches for one rank, resumable exactly (see the module docstring).

    Args:
        examples: an `Examples` object (TokenizedExamples, sni.SNIExamples).
        batch_size: examples per batch on this rank (the micro-batch); a global batch is batch_size x world_size.
        seed: the run's seed; epoch e shuffles with random.Random(seed + e), as SNIBatches did.
        batching: naive | grouped | packed.
        max_seq_len, max_target_len: the row capacity in packed mode (examples are already cut to them).
        group_size: global batches per mega-batch (grouped).
        decoder_start_id: the model's decoder start token (T5: 0, the pad id), for packed decoder_input_ids.
        pack_attention_tokens: the attention cost of `pack_cost` (packed), see PACK_ATTENTION_TOKENS.
    `len()` is the number of batches per epoch on each rank; the incomplete tail of a shuffled epoch is dropped
    so that every rank runs as many batches. State: epoch and batches consumed in it.
    """

    def __init__(self, examples: Examples, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 batching: str = "grouped", pad_id: int = 0, max_seq_len: int | None = None,
                 max_target_len: int | None = None, pad_to_multiple_of: int | None = 8,
                 group_size: int = GROUP_SIZE, decoder_start_id: int = 0,
                 pack_attention_tokens: float = PACK_ATTENTION_TOKENS):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        if batching == "packed" and not (max_seq_len and max_target_len):
            raise ValueError("packed batches need max_seq_len and max_target_len (the row size)")
        if batch_size < 1 or group_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, group_size={group_size}, rank={rank}/{world_size}")
        self.examples, self.batching = examples, batching
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.pad_id, self.pad_to_multiple_of, self.group_size = pad_id, pad_to_multiple_of, group_size
        self.max_seq_len, self.max_target_len, self.decoder_start_id = max_seq_len, max_target_len, decoder_start_id
        self.pack_attention_tokens = pack_attention_tokens
        self.epoch = self.position = 0
        self._plan: tuple[int, list[list[int]]] | None = None
        if len(self) == 0:
            raise DataError(f"{len(examples)} training examples are fewer than one global batch "
                            f"({batch_size} x {world_size} processes); lower optim.batch_size")

    def __len__(self) -> int:
        """Batches per epoch for each rank."""
        return len(self.examples) // (self.batch_size * self.world_size)

    def plan(self, epoch: int) -> list[list[int]]:
        """This rank's example indices for every batch of `epoch`, in order (a pure function of seed and epoch)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        B, W, r = self.batch_size, self.world_size, self.rank
        G = B * W
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        order = order[:len(self) * G]
        if self.batching == "grouped":
            inputs, targets = self.examples.epoch(epoch)
            batches = []
            step = self.group_size * G
            for start in range(0, len(order), step):
                mega = sorted(order[start:start + step], key=lambda i: (len(inputs[i]), len(targets[i])))
                batches += [mega[k:k + G][r::W] for k in range(0, len(mega), G)]
            random.Random(f"{self.seed}:{epoch}:grouped").shuffle(batches)
        else:
            batches = [order[k + r * B:k + (r + 1) * B] for k in range(0, len(order), G)]
        self._plan = (epoch, batches)
        return batches

    def collate(self, epoch: int, index: list[int]) -> dict[str, Any]:
        inputs, targets = self.examples.epoch(epoch)
        xs, ys = [inputs[i] for i in index], [targets[i] for i in index]
        if self.batching == "packed":
            rows = pack_rows([len(x) for x in xs], [len(y) for y in ys], self.max_seq_len, self.max_target_len,
                             self.pack_attention_tokens)
            batch = collate_packed(xs, ys, rows, pad_id=self.pad_id, decoder_start_id=self.decoder_start_id,
                                   pad_to_multiple_of=self.pad_to_multiple_of)
            batch["index"] = [index[p] for row in rows for p in row]
            return batch
        batch = collate_padded(xs, ys, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
        batch["index"] = list(index)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            plan = self.plan(self.epoch)
            while self.position < len(plan):
                index = plan[self.position]
                self.position += 1
                yield self.collate(self.epoch, index)
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "batching": self.batching}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("batching", self.batching)
        if saved != self.batching:
            # grouped/packed batches hold other examples in another order: the position would mean nothing
            raise DataError(f"the checkpoint's data position is for data.batching={saved}, this run uses "
                            f"data.batching={self.batching}; resume with data.batching={saved}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------------- evaluation


def eval_batches(examples: Examples, *, batch_size: int, pad_id: int = 0, rank: int = 0, world_size: int = 1,
                 pad_to_multiple_of: int | None = 8, epoch: int = 0) -> Iterator[dict[str, Any]]:
    """Every example once, in padded batches of similar length, longest first; rank r takes batches r, r+W, ...

    For held-out loss: no shuffling, no dropped tail (ranks may get one batch more or less; nanot5.evaluate's
    heldout_metrics handles that). Multi-reference examples are scored on the reference drawn for `epoch`.
    """
    inputs, targets = examples.epoch(epoch)
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), -len(targets[i]), i))
    for b, start in enumerate(range(0, len(order), batch_size)):
        if b % world_size != rank:
            continue
        index = order[start:start + batch_size]
        batch = collate_padded([inputs[i] for i in index], [targets[i] for i in index], pad_id=pad_id,
                               pad_to_multiple_of=pad_to_multiple_of)
        batch["index"] = index
        yield batch
