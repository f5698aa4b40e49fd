"""The fine-tuning data of a config: tokenized training and validation examples, SNI or any seq2seq source.

    sets = finetune_sets(cfg, tokenizer)
    train = Seq2SeqBatches(sets.train, batch_size=micro, seed=cfg.seed, batching=cfg.data.batching, ...)
    for line in sets.describe(): print(line)

data.source=sni reads Super-Natural Instructions from data.sni_dir (training: the split's train tasks, a seeded
sample of data.max_num_instances_per_task each; validation: its test tasks, the first
data.max_num_instances_per_eval_task each, as Tk-Instruct evaluates). Any other source is read by
nanot5/data/seq2seq.py with the data.* columns/template/validation keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nanot5.data.batching import Examples, encode_examples, truncation_message


@dataclass
class FinetuneSets:
    """Tokenized examples and the per-example fields evaluation needs.

    train, validation: `batching.Examples` (validation None when the data has no validation set).
    validation_records: one dict per validation example, aligned with `validation`: id, input (the model input
        text: the prompt for SNI), references (list of acceptable outputs); SNI adds task and category.
    report: sources, record counts, skipped records, truncation counts (train_tokens / validation_tokens).
    """

    train: Examples
    validation: Examples | None
    validation_records: list[dict[str, Any]] | None
    sni: bool
    report: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> list[str]:
        """Lines for the log: what is trained and validated on, what was skipped or cut."""
        r = self.report
        lines = [f"train: {len(self.train)} examples from {r['train_source']}"]
        if self.validation is None:
            lines.append("validation: none (set data.validation_source or data.validation_fraction for held-out "
                         "loss and generation metrics)")
        else:
            lines.append(f"validation: {len(self.validation)} examples from {r['validation_source']}")
        for part in ("train", "validation"):
            skipped = r.get("skipped", {}).get(part)
            if skipped:
                lines.append(f"{part}: skipped {sum(skipped.values())} unusable records {dict(skipped)}")
            if r.get(f"{part}_tokens"):
                lines.append(truncation_message(r[f"{part}_tokens"], max_seq_len=r["max_seq_len"],
                                                max_target_len=r["max_target_len"], what=part))
        return lines


def sni_prompt_options(data) -> dict[str, Any]:
    """SNIExamples/SNICollator keyword arguments from a DataConfig."""
    return dict(max_source_length=data.max_seq_len, max_target_length=data.max_target_len,
                add_task_name=data.add_task_name, add_task_definition=data.add_task_definition,
                num_pos_examples=data.num_pos_examples, num_neg_examples=data.num_neg_examples,
                add_explanation=data.add_explanation, tk_instruct=data.tk_instruct)


def finetune_sets(cfg, tokenizer, *, validation: bool = True) -> FinetuneSets:
    """Training (and, unless validation=False, validation) examples of `cfg` (a nanot5.config.Config).

    Every rank may call it: it reads and tokenizes everything, deterministically from cfg.seed.
    """
    d = cfg.data
    report: dict[str, Any] = {"max_seq_len": d.max_seq_len, "max_target_len": d.max_target_len}
    if d.source == "sni":
        from nanot5.data.sni import SNIExamples, load_sni

        skipped: dict[str, Counter] = {"train": Counter(), "validation": Counter()}
        records = load_sni(d.sni_dir, "train", split=d.sni_split,
                           max_num_instances_per_task=d.max_num_instances_per_task, seed=cfg.seed,
                           skipped=skipped["train"])
        train = SNIExamples(records, tokenizer, seed=cfg.seed, keep_sources=False, **sni_prompt_options(d))
        report.update(train_source=f"SNI {d.sni_dir} split {d.sni_split!r} (train tasks)", skipped=skipped,
                      train_tokens=train.stats)
        val, val_records = None, None
        if validation:
            val, val_records = _sni_validation(cfg, tokenizer, skipped["validation"])
            report.update(validation_source=f"SNI {d.sni_dir} split {d.sni_split!r} (test tasks)",
                          validation_tokens=val.stats)
        return FinetuneSets(train=train, validation=val, validation_records=val_records, sni=True, report=report)

    from nanot5.data.seq2seq import load_seq2seq_splits

    splits = load_seq2seq_splits(
        d.source, validation_source=d.validation_source if validation else "",
        validation_fraction=d.validation_fraction, seed=cfg.seed, input_column=d.input_column,
        target_column=d.target_column, template=d.template, target_template=d.target_template,
        on_error=d.on_error)
    report.update(splits.report)

    def encode(records):
        return encode_examples(tokenizer, [r["input"] for r in records], [r["references"] for r in records],
                               max_seq_len=d.max_seq_len, max_target_len=d.max_target_len, seed=cfg.seed)

    train = encode(splits.train)
    report["train_tokens"] = train.stats
    val, val_records = None, None
    if validation and splits.validation is not None:
        val = encode(splits.validation)
        report["validation_tokens"] = val.stats
        val_records = [{"id": r["id"], "input": r["input"], "references": r["references"]}
                       for r in splits.validation]
    return FinetuneSets(train=train, validation=val, validation_records=val_records, sni=False, report=report)



def prediction_records(cfg, tokenizer) -> list[dict[str, Any]]:
    """The examples `nanot5 predict` generates for and scores: id, input (the model input text), references;
    SNI adds task and category.

    SNI: the split's test tasks (the first data.max_num_instances_per_eval_task each), prompts as in validation.
    Other sources: the validation set fine-tuning uses (data.validation_source, the held-out
    data.validation_fraction, or the source's own validation split), else every record of data.source
    (predicting a file of test inputs).
    """
    d = cfg.data
    if d.source == "sni":
        return _sni_validation(cfg, tokenizer, Counter())[1]
    from nanot5.data.seq2seq import load_seq2seq_splits

    splits = load_seq2seq_splits(
        d.source, validation_source=d.validation_source, validation_fraction=d.validation_fraction, seed=cfg.seed,
        input_column=d.input_column, target_column=d.target_column, template=d.template,
        target_template=d.target_template, on_error=d.on_error)
    records = splits.validation if splits.validation is not None else splits.train
    return [{"id": r["id"], "input": r["input"], "references": r["references"]} for r in records]


def _sni_validation(cfg, tokenizer, skipped: Counter):
    """SNI validation: the test tasks' examples and their prediction records (prompt as input)."""
    from nanot5.data.sni import SNIExamples, load_sni

    d = cfg.data
    test = load_sni(d.sni_dir, "test", split=d.sni_split, max_num_instances_per_task=d.max_num_instances_per_eval_task,
                    skipped=skipped)
    val = SNIExamples(test, tokenizer, seed=cfg.seed, **sni_prompt_options(d))
    records = [{"id": r["id"], "input": src, "references": list(r["references"]), "task": r["task"],
                "category": r["categories"][0] if r["categories"] else ""}
               for r, src in zip(test, val.sources(0))]
    return val, records
