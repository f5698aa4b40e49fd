"""Generation metrics: the official Super-Natural Instructions metric (exact match and ROUGE-L), and the
generic metrics of fine-tuning on any seq2seq data (`compute_generation_metrics`: exact_match, rougeL, bleu,
accuracy).

Reproduces `eval/automatic/evaluation.py` of allenai/natural-instructions (commit 8540acd3; Tk-Instruct's
`src/compute_metrics.py` has the same logic) for the default (English) track:

- exact match: `normalize_answer(pred) == normalize_answer(ref)`, where normalize_answer lower-cases, deletes
  every character of `string.punctuation` and collapses whitespace (articles are kept, unlike SQuAD);
- ROUGE-L: the F-measure of Google's `rouge_score` `RougeScorer(['rougeL'], use_stemmer=True)` with its default
  tokenizer (we call the package, we do not re-implement ROUGE);
- each instance scores the maximum over its references;
- a metric is 100 x the mean over instances, rounded to 4 decimals; the overall score pools all instances
  (a micro-average, not a mean of task means); per-task and per-category scores use the same formula.

The official script does not strip predictions; Tk-Instruct strips them (`pred.strip()`) before scoring. Both give
the same numbers: normalize_answer collapses whitespace and the rouge_score tokenizer splits on it, so leading and
trailing whitespace never changes either metric. We follow the official script and leave predictions as given.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_SCORER = None  # one RougeScorer for the whole process: building one loads the stemmer


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (SQuAD v1.1 normalisation minus article removal)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> bool:
    """True when prediction and reference are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] from rouge_score (English tokenizer, Porter stemmer)."""
    return _rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def _check(predictions: Sequence[str | None], references: Sequence[Sequence[str]]) -> list[str]:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references[{i}] must be a list of strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every instance needs at least one reference")
    # the official script scores a missing prediction as the empty string
    return ["" if p is None else p for p in predictions]


def compute_metrics(predictions: Sequence[str | None], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Official SNI metrics over all instances.

    Args:
        predictions: one string per instance; None (a missing prediction) counts as "".
        references: for each instance, the list of acceptable outputs (the task's `output` list).
    Returns:
        {"exact_match": float, "rougeL": float}, each 100 x mean over instances of the max over references,
        rounded to 4 decimals. With no instances both are 0.0.
    """
    preds = _check(predictions, references)
    if not preds:
        return {"exact_match": 0.0, "rougeL": 0.0}
    em = rouge = 0.0
    for pred, refs in zip(preds, references):
        em += max(float(exact_match(pred, r)) for r in refs)
        rouge += max(rouge_l(pred, r) for r in refs)
    n = len(preds)
    return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rouge / n, 4)}


def compute_grouped_metrics(
    predictions: Sequence[str | None], references: Sequence[Sequence[str]], groups: Sequence[str]
) -> dict[str, float]:
    """`compute_metrics` per group: {f"exact_match_for_{g}": ..., f"rougeL_for_{g}": ...}, in first-seen order."""
    if not len(predictions) == len(references) == len(groups):
        raise ValueError(
            f"predictions ({len(predictions)}), references ({len(references)}) and groups ({len(groups)}) "
            "must have the same length"
        )
    by_group: dict[str, tuple[list, list]] = {}
    for pred, refs, group in zip(predictions, references, groups):
        preds_g, refs_g = by_group.setdefault(group, ([], []))
        preds_g.append(pred)
        refs_g.append(refs)
    results = {}
    for group, (preds_g, refs_g) in by_group.items():
        for metric, value in compute_metrics(preds_g, refs_g).items():
            results[f"{metric}_for_{group}"] = value
    return results


def category_group(category: str) -> str:
    """Official group name of a category: lower-cased, whitespace -> "_" ("Title Generation" -> "title_generation")."""
    return "_".join(category.lower().split())


def evaluate_sni(
    predictions: Sequence[str | None],
    references: Sequence[Sequence[str]],
    tasks: Sequence[str],
    categories: Sequence[str],
    *,
    print_table: bool = False,
) -> dict[str, float]:
    """Overall, per-category and per-task metrics in one flat dict, as the official script reports them.

    Args:
        tasks: the task name of each instance (e.g. "task1393_superglue_copa_text_completion").
        categories: the task category of each instance (a task's `Categories[0]`, as Tk-Instruct uses),
            grouped with `category_group`.
        print_table: also print `format_table` of the result.
    Returns:
        {"exact_match", "rougeL", "exact_match_for_<category>", "rougeL_for_<category>",
         "exact_match_for_<task>", "rougeL_for_<task>", ...}.
    """
    results = compute_metrics(predictions, references)
    results.update(compute_grouped_metrics(predictions, references, [category_group(c) for c in categories]))
    results.update(compute_grouped_metrics(predictions, references, list(tasks)))
    if print_table:
        print(format_table(results, tasks=tasks, categories=categories))
    return results


def format_table(results: dict[str, float], *, tasks: Sequence[str], categories: Sequence[str]) -> str:
    """A readable text table of `evaluate_sni` results: overall, then categories, then tasks (sorted by name)."""
    counts: dict[str, int] = {}
    for name in [category_group(c) for c in categories] + list(tasks):
        counts[name] = counts.get(name, 0) + 1
    cat_names = sorted({category_group(c) for c in categories})
    task_names = sorted(set(tasks))
    width = max([len(n) for n in cat_names + task_names] + [len("overall")])

    def row(label: str, em: float, rl: float, n: int) -> str:
        return f"{label:<{width}}  {n:>6}  {em:>11.2f}  {rl:>8.2f}"

    header = f"{'':<{width}}  {'n':>6}  {'exact_match':>11}  {'rougeL':>8}"
    lines = [header, "-" * len(header), row("overall", results["exact_match"], results["rougeL"], len(tasks))]
    for title, names in (("category", cat_names), ("task", task_names)):
        lines += ["", f"per {title}:"]
        for name in names:
            em, rl = results[f"exact_match_for_{name}"], results[f"rougeL_for_{name}"]
            lines.append(row(name, em, rl, counts[name]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Generic generation metrics (fine-tuning on any seq2seq data)
#
# Every metric is 100 x a corpus score in [0, 1], rounded to 4 decimals like the SNI metric, and higher is better.
# An instance may have several acceptable references: the per-instance metrics take the maximum over them (as the
# SNI script does); BLEU is a corpus statistic and uses them as sacrebleu's multiple reference streams.

GENERATION_METRICS = ("exact_match", "rougeL", "bleu", "accuracy")


def label_match(prediction: str, reference: str) -> bool:
    """`accuracy`'s per-pair test: equal strings after stripping surrounding whitespace.

    Meant for label-style targets ("positive", "entailment", "3"): unlike `exact_match` it keeps case and
    punctuation, so "Positive" != "positive". T5's own `accuracy` metric (t5/evaluation/metrics.py) compares the
    strings as they are; we strip because a decoded generation may carry a leading/trailing space.
    """
    return prediction.strip() == reference.strip()


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (its defaults: 13a tokenizer, exp smoothing, case-sensitive), 0..100.

    Instances may have different numbers of references: sacrebleu takes one stream per reference position and
    `None` where an instance has fewer (its documented way to vary the reference count).
    """
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def _max_over_refs(fn: Callable[[str, str], float]) -> Callable[[Sequence[str], Sequence[Sequence[str]]], float]:
    def corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        total = sum(max(float(fn(p, r)) for r in refs) for p, refs in zip(predictions, references))
        return 100.0 * total / len(predictions)

    return corpus


_CORPUS_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "exact_match": _max_over_refs(exact_match),  # SNI normalisation: case, punctuation, spacing ignored
    "rougeL": _max_over_refs(rouge_l),  # rouge_score F-measure, Porter stemmer
    "accuracy": _max_over_refs(label_match),  # stripped string equality
    "bleu": corpus_bleu,
}


def compute_generation_metrics(
    predictions: Sequence[str | None],
    references: Sequence[str | Sequence[str]],
    metrics: Sequence[str] = ("exact_match", "rougeL"),
) -> dict[str, float]:
    """The named metrics (any of GENERATION_METRICS) of predictions against references.

    Args:
        predictions: one string per instance; None (a missing prediction) counts as "".
        references: per instance a string, or a non-empty list of acceptable strings.
        metrics: names, in the order of the returned dict.
    Returns:
        {name: 100 x corpus score, rounded to 4 decimals}; every metric is 0.0 with no instances.
        exact_match, rougeL and accuracy average the per-instance maximum over references; bleu is sacrebleu's
        corpus BLEU with all references.
    """
    unknown = [m for m in metrics if m not in _CORPUS_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(GENERATION_METRICS)}")
    refs = [[r] if isinstance(r, str) else r for r in references]
    preds = _check(predictions, refs)
    if not preds:
        return {m: 0.0 for m in metrics}
    return {m: round(_CORPUS_METRICS[m](preds, refs), 4) for m in metrics}


def format_metrics(metrics: dict[str, float], count: int) -> str:
    """A one-row text table of generation metrics over `count` examples."""
    names = list(metrics)
    header = "  ".join(f"{n:>11}" for n in ["examples", *names])
    row = "  ".join([f"{count:>11}"] + [f"{metrics[n]:>11.2f}" for n in names])
    return f"{header}\n{row}"
