"""Super-Natural Instructions (SNI) tasks -> Tk-Instruct prompts -> padded batches.

Reads the layout of github.com/allenai/natural-instructions:

    <sni_dir>/splits/<split>/train_tasks.txt   one task name per line
    <sni_dir>/splits/<split>/test_tasks.txt
    <sni_dir>/tasks/<task>.json                Definition, Positive/Negative Examples, Instances, ...

and turns every instance into the prompt of Tk-Instruct's `DataCollatorForNI` (allenai/tk-instruct
src/ni_collator.py, also used by nanoT5's fine-tuning): optional task name, "Definition: ...", positive and
negative examples added one at a time while the prompt fits `max_source_length` tokens, then
"Now complete the following example -\\nInput: ...\\nOutput: ". The rules are written out in `format_prompt`.
"""

from __future__ import annotations

import json
import random
import string
import subprocess
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanot5.data.batching import draw_targets, encode_texts
from nanot5.errors import DataError

SNI_REPO_URL = "https://github.com/allenai/natural-instructions"

# Tk-Instruct's random-encoding mode (`tk_instruct=True`): each instance draws one of these prompt layouts.
TK_INSTRUCT_ENCODINGS: tuple[dict[str, Any], ...] = (
    # definition only
    dict(add_task_name=False, add_task_definition=True, num_pos_examples=0, num_neg_examples=0, add_explanation=False),
    # two positive examples only
    dict(add_task_name=False, add_task_definition=False, num_pos_examples=2, num_neg_examples=0, add_explanation=False),
    # definition + two positive examples
    dict(add_task_name=False, add_task_definition=True, num_pos_examples=2, num_neg_examples=0, add_explanation=False),
    # definition + two positive + two negative examples
    dict(add_task_name=False, add_task_definition=True, num_pos_examples=2, num_neg_examples=2, add_explanation=False),
    # definition + two positive examples with their explanations
    dict(add_task_name=False, add_task_definition=True, num_pos_examples=2, num_neg_examples=0, add_explanation=True),
)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def read_task_list(path: str | Path) -> list[str]:
    """Task names of a split file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SNI split file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _as_text(value: Any) -> str:
    # Definition is a one-element list in SNI v2 and a plain string in older files; Tk-Instruct uses the first entry.
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value)


def load_task(
    path: str | Path,
    *,
    max_num_instances: int | None = 100,
    shuffle_seed: int | None = None,
    rng: random.Random | None = None,
    skipped: Counter | None = None,
) -> list[dict[str, Any]]:
    """Records of one task file, the first `max_num_instances` instances (all of them with None).

    Each record is a plain dict: id, task, categories, definition, positive_examples, negative_examples
    (lists of {"input", "output", "explanation"}), input, references (list of strings; may hold "").
    Upstream quirks are tolerated: a NaN in `URL` (Python's json accepts it; the field is not kept) and
    empty-string references. With `rng` (or a fresh `random.Random(shuffle_seed)`) the instances are shuffled
    before truncation, as Tk-Instruct's ni_dataset.py does for training tasks; the test split's first 100 are the
    official evaluation instances.

    An instance that cannot be trained on or scored, one with an empty (or null) `output` list or a null `input`,
    is dropped after the selection and counted in `skipped` ("empty_output", "null_input"), never an error.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    for key in ("Definition", "Positive Examples", "Instances"):
        if key not in data:
            raise DataError(f"{path}: missing key {key!r}")
    task = path.stem
    categories = [str(c) for c in data.get("Categories", [])]
    definition = _as_text(data["Definition"])
    pos = [_example(path, "Positive Examples", i, e) for i, e in enumerate(data["Positive Examples"])]
    neg = [_example(path, "Negative Examples", i, e) for i, e in enumerate(data.get("Negative Examples", []))]

    # (position in the file, instance): messages name the instance's index in the file whatever the order
    instances = list(enumerate(data["Instances"]))
    if rng is None and shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
    if rng is not None:
        rng.shuffle(instances)
    if max_num_instances is not None and max_num_instances >= 0:
        instances = instances[:max_num_instances]

    records = []
    for i, inst in instances:
        for key in ("input", "output"):
            if not isinstance(inst, dict) or key not in inst:
                raise DataError(f"{path}: Instances[{i}] has no {key!r}")
        refs = inst["output"]
        if isinstance(refs, str):  # a few community copies store a single reference as a string
            refs = [refs]
        if refs is None or refs == [] or inst["input"] is None:
            if skipped is not None:
                skipped["null_input" if inst["input"] is None else "empty_output"] += 1
            continue
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{path}: Instances[{i}] 'output' must be a list of strings, got {refs!r}")
        records.append(
            dict(
                id=str(inst.get("id", f"{task}-{i}")),
                task=task,
                categories=categories,
                definition=definition,
                positive_examples=pos,
                negative_examples=neg,
                input=str(inst["input"]),
                references=list(refs),
            )
        )
    return records


def _example(path: Path, key: str, i: int, ex: Any) -> dict[str, str]:
    if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
        raise ValueError(f"{path}: {key}[{i}] needs 'input' and 'output'")
    out = {"input": str(ex["input"]), "output": str(ex["output"])}
    if "explanation" in ex:
        out["explanation"] = str(ex["explanation"])
    return out


def load_sni(
    sni_dir: str | Path,
    subset: str = "train",
    *,
    split: str = "default",
    max_num_instances_per_task: int | None = 100,
    shuffle_seed: int | None = None,
    seed: int | None = 0,
    skipped: Counter | None = None,
) -> list[dict[str, Any]]:
    """All records of the tasks listed in `<sni_dir>/splits/<split>/<subset>_tasks.txt`.

    Args:
        sni_dir: a natural-instructions checkout (holds `splits/` and `tasks/`).
        subset: "train" or "test" (also any other `<subset>_tasks.txt`, e.g. "dev", if the split has one).
        split: the folder under `splits/` ("default" is the official English split of 756 train / 119 test tasks).
        max_num_instances_per_task: instances kept per task (100, as Tk-Instruct and nanoT5).
        seed: how the instances are chosen, following Tk-Instruct's ni_dataset.py (nanoT5 uses the same file).
            Test tasks: the first N in file order (upstream puts the 100 label-balanced evaluation instances
            first; it also shuffles those 100 before cutting to N, which changes nothing for the official N=100).
            Any other subset: a random sample of N, drawn by shuffling each task's instances and keeping the
            first N, with ONE `random.Random(seed)` that runs through the tasks in list order (upstream shuffles
            with Python's global `random`, seeded once with the run's seed, in the same order). None: the first
            N of every task (nanot5 before this fix).
        shuffle_seed: shuffle each task's instances with its own `random.Random(shuffle_seed)` before keeping N,
            in any subset (overrides `seed`).
        skipped: if given, counts of dropped instances (see `load_task`) are added to it.
    Listed tasks without a file are skipped with one warning giving their count; if none is found, an error.
    Instances with an empty output list or a null input are skipped with one warning giving their count.
    """
    sni_dir = Path(sni_dir)
    split_dir = sni_dir / "splits" / split
    list_path = split_dir / f"{subset}_tasks.txt"
    if not list_path.is_file():
        have = sorted(p.name for p in (sni_dir / "splits").glob("*")) if (sni_dir / "splits").is_dir() else []
        raise FileNotFoundError(
            f"SNI split file not found: {list_path} (splits present in {sni_dir / 'splits'}: {have or 'none'}); "
            "point data.sni_dir at a natural-instructions checkout (`nanot5 data prepare sni DIR`)"
        )
    names = read_task_list(list_path)
    task_dir = sni_dir / "tasks"
    present = [n for n in names if (task_dir / f"{n}.json").is_file()]
    if not present:
        raise FileNotFoundError(
            f"none of the {len(names)} tasks listed in {list_path} has a file in {task_dir}"
        )
    if len(present) < len(names):
        have = set(present)
        missing = [n for n in names if n not in have]
        warnings.warn(
            f"SNI: {len(missing)} of {len(names)} tasks listed in {list_path} have no file in {task_dir} and are "
            f"skipped (first: {missing[0]})",
            stacklevel=2,
        )
    rng = None
    if shuffle_seed is None and seed is not None and subset != "test":
        rng = random.Random(seed)
    dropped: Counter = Counter()
    records = []
    for name in present:
        records += load_task(task_dir / f"{name}.json", max_num_instances=max_num_instances_per_task,
                             shuffle_seed=shuffle_seed, rng=rng, skipped=dropped)
    if dropped:
        what = ", ".join(f"{n} with {'a null input' if k == 'null_input' else 'an empty output list'}"
                         for k, n in sorted(dropped.items()))
        warnings.warn(f"SNI: skipped {sum(dropped.values())} {subset} instances that cannot be used ({what})",
                      stacklevel=2)
    if skipped is not None:
        skipped.update(dropped)
    return records


# ----------------------------------------------------------------------------------------------------------------
# Prompt formatting (the rules of Tk-Instruct's DataCollatorForNI)


def _end_sentence(text: str) -> str:
    # Tk-Instruct ends every field with a period unless it already ends with ASCII punctuation.
    return text if text and text[-1] in string.punctuation else text + "."


def _example_block(kind: str, number: int, ex: dict[str, str], add_explanation: bool) -> str:
    # " Positive Example 1 -\nInput: <in>.\n Output: <out>.\n[ Explanation: <why>.\n]\n"
    block = _end_sentence(f" {kind} Example {number} -\nInput: {ex['input'].strip()}") + "\n"
    block = _end_sentence(block + f" Output: {ex['output'].strip()}") + "\n"
    if add_explanation and "explanation" in ex:
        block = _end_sentence(block + f" Explanation: {ex['explanation'].strip()}") + "\n"
    return block + "\n"


def _num_tokens(tokenizer: Any, text: str) -> int:
    # counted like Tk-Instruct: the tokenizer's default special tokens (T5: the trailing </s>) included
    return len(tokenizer(text)["input_ids"])


def format_prompt(
    record: dict[str, Any],
    *,
    tokenizer: Any,
    max_source_length: int = 1024,
    add_task_name: bool = False,
    add_task_definition: bool = True,
    num_pos_examples: int = 2,
    num_neg_examples: int = 0,
    add_explanation: bool = False,
    _full_length: list[int] | None = None,
) -> str:
    """The Tk-Instruct source string of one record.

    Layout: `task_name + definition + positive examples + negative examples + task_input`, where
      task_name  = "<task>. "                                         (only with add_task_name)
      definition = "Definition: <definition>.\\n\\n"                    (only with add_task_definition)
      example    = " Positive Example <k> -\\nInput: <in>.\\n Output: <out>.\\n[ Explanation: <why>.\\n]\\n"
                   (" Negative Example <k> -..." for negative ones)
      task_input = "Now complete the following example -\\nInput: <input>.\\nOutput: "
    Every field is stripped and gets a "." unless it ends with ASCII punctuation. Examples are tried in order and
    the first one that does not fit stops the list: an example is kept when the token count of
    `definition + " ".join(kept examples) + this example + task_input` is <= max_source_length (Tk-Instruct's
    test: it leaves out the task name and joins the kept examples with spaces, though the prompt joins them with
    ""; negative examples are tested after all kept positive ones). A final prompt longer than max_source_length
    tokens is cut to its first max_source_length tokens and decoded without special tokens. (`_full_length`, if
    given, gets the token count of the prompt before that cut appended: SNIExamples counts truncations with it.)
    """
    task_input = _end_sentence("Now complete the following example -\n" + f"Input: {record['input'].strip()}")
    task_input += "\nOutput: "
    task_name = record["task"] + ". " if add_task_name else ""
    definition = ""
    if add_task_definition:
        definition = _end_sentence("Definition: " + record["definition"].strip()) + "\n\n"

    pos: list[str] = []
    for k, ex in enumerate(record["positive_examples"][:num_pos_examples]):
        block = _example_block("Positive", k + 1, ex, add_explanation)
        if _num_tokens(tokenizer, definition + " ".join(pos) + block + task_input) > max_source_length:
            break
        pos.append(block)
    neg: list[str] = []
    for k, ex in enumerate(record["negative_examples"][:num_neg_examples]):
        block = _example_block("Negative", k + 1, ex, add_explanation)
        if _num_tokens(tokenizer, definition + " ".join(pos) + " ".join(neg) + block + task_input) > max_source_length:
            break
        neg.append(block)

    source = task_name + definition + "".join(pos) + "".join(neg) + task_input
    ids = tokenizer(source)["input_ids"]
    if _full_length is not None:
        _full_length.append(len(ids))
    if len(ids) <= max_source_length:
        return source
    return tokenizer.decode(ids[:max_source_length], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# Batching


class SNICollator:
    """Records -> a padded batch, the way Tk-Instruct's DataCollatorForNI builds one.

    Returns a dict with torch.long tensors
        input_ids      (B, S)  prompt tokens (truncated to max_source_length), padded with the tokenizer's pad id
        attention_mask (B, S)  1 on tokens, 0 on padding
        labels         (B, T)  one reference per instance, truncated to max_target_length, padded with -100
    (S and T rounded up to a multiple of pad_to_multiple_of; `labels` is None when no record has references)
    and the raw strings for prediction: ids, tasks, categories (each task's first category), sources (the prompts),
    targets (the drawn reference of each instance) and references (all of them).

    The reference of each instance, and with tk_instruct=True the prompt layout (one of TK_INSTRUCT_ENCODINGS), are
    drawn from one `random.Random(seed)`; `state_dict`/`load_state_dict` save and restore it for exact resume.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_source_length: int = 1024,
        max_target_length: int = 128,
        pad_to_multiple_of: int | None = 8,
        add_task_name: bool = False,
        add_task_definition: bool = True,
        num_pos_examples: int = 2,
        num_neg_examples: int = 0,
        add_explanation: bool = False,
        tk_instruct: bool = False,
        seed: int = 0,
        label_pad_token_id: int = -100,
    ):
        if max_source_length < 1 or max_target_length < 1:
            raise ValueError(
                f"max_source_length ({max_source_length}) and max_target_length ({max_target_length}) must be >= 1"
            )
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.prompt_options = dict(
            add_task_name=add_task_name,
            add_task_definition=add_task_definition,
            num_pos_examples=num_pos_examples,
            num_neg_examples=num_neg_examples,
            add_explanation=add_explanation,
        )
        self.tk_instruct = tk_instruct
        self.label_pad_token_id = label_pad_token_id
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if self.pad_token_id is None:
            self.pad_token_id = 0  # T5's <pad>
        self.rng = random.Random(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]  # tuples may come back as lists from JSON/YAML
        self.rng.setstate((version, tuple(internal), gauss))

    def source(self, record: dict[str, Any]) -> str:
        """The prompt of one record; in tk_instruct mode it draws a layout from the collator's RNG."""
        options = self.rng.choice(TK_INSTRUCT_ENCODINGS) if self.tk_instruct else self.prompt_options
        return format_prompt(record, tokenizer=self.tokenizer, max_source_length=self.max_source_length, **options)

    def _encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        # truncation keeps the trailing </s>, as in Tk-Instruct's tokenizer(..., truncation=True) call
        ids = self.tokenizer(texts, max_length=max_length, truncation=True)["input_ids"]
        return [list(x)[:max_length] for x in ids]

    def _pad(self, seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return out, mask

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not records:
            raise ValueError("SNICollator got an empty batch")
        sources = [self.source(r) for r in records]
        input_ids, attention_mask = self._pad(self._encode(sources, self.max_source_length), self.pad_token_id)
        batch: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask)

        have_refs = [bool(r["references"]) for r in records]
        if any(have_refs) and not all(have_refs):
            bad = next(r["id"] for r, h in zip(records, have_refs) if not h)
            raise ValueError(f"SNI instance {bad} has no references while others in its batch do")
        if all(have_refs):
            # one reference drawn per instance: multi-reference tasks train on each answer over the epochs
            targets = [self.rng.choice(r["references"]) for r in records]
            labels, _ = self._pad(self._encode(targets, self.max_target_length), self.label_pad_token_id)
        else:
            targets, labels = [], None
        batch.update(
            labels=labels,
            ids=[r["id"] for r in records],
            tasks=[r["task"] for r in records],
            categories=[r["categories"][0] if r["categories"] else "" for r in records],
            sources=sources,
            targets=targets,
            references=[list(r["references"]) for r in records],
        )
        return batch


class SNIExamples:
    """SNI records as tokenized examples for `nanot5.data.batching` (length-grouped or packed batches).

    The tokens are SNICollator's, token for token: the prompt of `format_prompt` and the drawn reference, each
    tokenized with truncation to max_source_length / max_target_length. Choices are drawn per epoch instead of
    per batch (a pure function of seed and epoch, for exact resume and length-aware batching): each example's
    reference (`batching.draw_targets`) and, with tk_instruct=True, its prompt layout (one of
    TK_INSTRUCT_ENCODINGS, random.Random(f"{seed}:{epoch}:layout")). Without tk_instruct the prompts are built
    and tokenized once.

    Fields: records, stats (see batching.encode_examples), layouts(epoch) (tk_instruct: the layout index drawn for
    each example), sources(epoch) (the prompt strings, e.g. for generation).
    """

    def __init__(self, records: list[dict[str, Any]], tokenizer: Any, *, max_source_length: int = 1024,
                 max_target_length: int = 128, add_task_name: bool = False, add_task_definition: bool = True,
                 num_pos_examples: int = 2, num_neg_examples: int = 0, add_explanation: bool = False,
                 tk_instruct: bool = False, seed: int = 0, keep_sources: bool = True):
        self.records, self.seed, self.tk_instruct = records, seed, tk_instruct
        self.keep_sources = keep_sources  # False: do not hold the prompt strings (training: only tokens needed)
        self.hf = getattr(tokenizer, "hf", tokenizer)
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.prompt_options = dict(add_task_name=add_task_name, add_task_definition=add_task_definition,
                                   num_pos_examples=num_pos_examples, num_neg_examples=num_neg_examples,
                                   add_explanation=add_explanation)
        flat = [ref for r in records for ref in r["references"]]
        ref_ids, ref_lens = encode_texts(self.hf, flat, max_target_length)
        self.references, k = [], 0
        for r in records:
            self.references.append(ref_ids[k:k + len(r["references"])])
            k += len(r["references"])
        self._cache: tuple[int, list[str], list[np.ndarray]] | None = None
        self._targets: tuple[int, list[np.ndarray]] | None = None
        self._fixed = None
        inputs = self._encode_epoch(0)[1]
        self.stats = {"examples": len(records), "inputs_truncated": self._truncated,
                      "targets_truncated": sum(n > max_target_length for n in ref_lens),
                      "max_input_tokens": self._longest, "max_target_tokens": max(ref_lens, default=0)}
        if not tk_instruct:
            self._fixed = inputs

    def __len__(self) -> int:
        return len(self.records)

    def layouts(self, epoch: int) -> list[int]:
        """Index into TK_INSTRUCT_ENCODINGS of each example's prompt layout in `epoch` (tk_instruct mode)."""
        rng = random.Random(f"{self.seed}:{epoch}:layout")
        return [rng.randrange(len(TK_INSTRUCT_ENCODINGS)) for _ in self.records]

    def sources(self, epoch: int = 0) -> list[str]:
        """The prompt strings of `epoch` (built again when keep_sources=False)."""
        if self.keep_sources:
            return self._encode_epoch(epoch)[0]
        return self._prompts(epoch)

    def _prompts(self, epoch: int, lengths: list[int] | None = None) -> list[str]:
        if self.tk_instruct:
            options = [TK_INSTRUCT_ENCODINGS[k] for k in self.layouts(epoch)]
        else:
            options = [self.prompt_options] * len(self.records)
        return [format_prompt(r, tokenizer=self.hf, max_source_length=self.max_source_length, _full_length=lengths,
                              **o) for r, o in zip(self.records, options)]

    def _encode_epoch(self, epoch: int) -> tuple[list[str], list[np.ndarray]]:
        if self._cache is not None and (self._cache[0] == epoch or not self.tk_instruct):
            return self._cache[1], self._cache[2]
        lengths: list[int] = []  # prompt tokens before format_prompt's cut
        sources = self._prompts(epoch, lengths)
        ids, _ = encode_texts(self.hf, sources, self.max_source_length)
        self._truncated = sum(n > self.max_source_length for n in lengths)
        self._longest = max(lengths, default=0)
        self._cache = (epoch, sources if self.keep_sources else [], ids)
        return sources, ids

    def epoch(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        inputs = self._fixed if self._fixed is not None else self._encode_epoch(epoch)[1]
        if self._targets is None or self._targets[0] != epoch:
            self._targets = (epoch, draw_targets(self.references, self.seed, epoch))
        return inputs, self._targets[1]


# ----------------------------------------------------------------------------------------------------------------
# `nanot5 data prepare sni DIR`


def _looks_like_sni(path: Path) -> bool:
    return (path / "splits").is_dir() and (path / "tasks").is_dir()


def prepare_sni(dest: str | Path, *, url: str = SNI_REPO_URL) -> Path:
    """Clone natural-instructions into `dest` (shallow); keep an existing checkout. Raises RuntimeError offline."""
    dest = Path(dest)
    if _looks_like_sni(dest):
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise RuntimeError(f"{dest} exists, is not empty and has no splits/ and tasks/: choose another directory")
    cmd = ["git", "clone", "--depth", "1", url, str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        proc = None
    if proc is None or proc.returncode != 0:
        why = "git is not installed" if proc is None else (proc.stderr.strip().splitlines() or ["git failed"])[-1]
        raise RuntimeError(
            f"could not clone {url} into {dest} ({why}).\n"
            "If this machine is offline: on a machine with internet run\n"
            f"    git clone --depth 1 {url}\n"
            f"and copy the folder here (it needs splits/ and tasks/, about 3 GB), or point data.sni_dir at an "
            "existing natural-instructions checkout."
        )
    if not _looks_like_sni(dest):
        raise RuntimeError(f"cloned {url} into {dest} but it has no splits/ and tasks/: is it natural-instructions?")
    return dest


def prepare_sni_main(argv: list[str]) -> int:
    """`nanot5 data prepare sni DIR [--url URL]`: fetch Super-Natural Instructions into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="nanot5 data prepare sni", description=prepare_sni_main.__doc__)
    parser.add_argument("dir", help="where to put the natural-instructions checkout")
    parser.add_argument("--url", default=SNI_REPO_URL, help="repository to clone (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = prepare_sni(args.dir, url=args.url)
    except RuntimeError as e:
        raise DataError(str(e).replace("\n", " ")) from None
    n_tasks = sum(1 for _ in (path / "tasks").glob("*.json"))
    print(f"SNI ready in {path} ({n_tasks} task files); use data.sni_dir={path}")
    return 0
