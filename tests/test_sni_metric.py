"""The official SNI metric (natural-instructions eval/automatic/evaluation.py).

Oracles: hand-computed ROUGE-L/LCS values, the SQuAD-minus-articles normalisation written out, and Google's
`rouge_score` called directly (its own RougeScorer, the official settings) on real SNI and C4 strings.
"""

from __future__ import annotations

import gzip
import json
import re

import pytest
from rouge_score import rouge_scorer

from nanot5 import metrics as sni
from nanot5.data.sni import load_task
from nanot5.metrics import (
    category_group,
    compute_grouped_metrics,
    compute_metrics,
    evaluate_sni,
    exact_match,
    format_table,
    normalize_answer,
    rouge_l,
)


@pytest.fixture(scope="module")
def oracle():
    """The scorer the official script builds, used as the reference implementation."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return lambda pred, ref: scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure


def official(preds, refs, oracle):
    """The official formula spelled out: 100 x mean over instances of max over references, 4 decimals."""
    preds = ["" if p is None else p for p in preds]
    em = sum(max(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(preds, refs))
    rl = sum(max(oracle(p, r) for r in rs) for p, rs in zip(preds, refs))
    return {"exact_match": round(100 * em / len(preds), 4), "rougeL": round(100 * rl / len(preds), 4)}


@pytest.mark.parametrize(
    "text,normal",
    [
        ("The Cat!", "the cat"),  # lower-case, punctuation gone, articles kept
        ("  a   b\tc\n", "a b c"),  # whitespace collapsed and stripped
        ("New-York, N.Y.", "newyork ny"),  # punctuation deleted, not replaced by a space
        ("«Café» — déjà", "«café» — déjà"),  # only ASCII punctuation is removed
        ('"A"', "a"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize(
    "pred,ref,em,rl",
    [
        # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
        ("the cat sat on the mat", "the cat is on the mat", 0.0, 5 / 6),
        # Porter stemming of tokens longer than 3 characters: running -> run, dogs -> dog
        ("running dogs", "run dog", 0.0, 1.0),
        # punctuation: ignored by both metrics
        ("Hello, World!", "hello world", 1.0, 1.0),
        # exact match deletes "-", the ROUGE tokenizer splits on it: "new york" vs "newyork"
        ("New-York", "newyork", 1.0, 0.0),
        # non-ASCII letters separate ROUGE tokens: "caf au lait" vs "cafe au lait", LCS 2 of 3
        ("café au lait", "cafe au lait", 0.0, 2 / 3),
        # no [a-z0-9] at all: no ROUGE tokens, score 0; the strings are still equal
        ("日本", "日本", 1.0, 0.0),
        # P = 2/2, R = 2/4, F = 2/3
        ("cat sat", "the cat sat down", 0.0, 2 / 3),
        ("", "anything", 0.0, 0.0),
        ("", "", 1.0, 0.0),  # empty-string reference (task1564 has one)
    ],
)
def test_hand_computed_single_reference(pred, ref, em, rl):
    assert exact_match(pred, ref) == bool(em)
    assert rouge_l(pred, ref) == pytest.approx(rl)
    assert compute_metrics([pred], [[ref]]) == {"exact_match": round(100 * em, 4), "rougeL": round(100 * rl, 4)}


def test_max_over_references_per_metric():
    refs = [["The cat.", "the cat sat down", "dog"]]
    # "the cat" equals reference 1 after normalisation: EM 1 and ROUGE-L 1 from it
    assert compute_metrics(["the cat"], refs) == {"exact_match": 100.0, "rougeL": 100.0}
    # "cat sat": EM 0 everywhere; ROUGE-L vs ref 1 "the cat": LCS 1, P = R = 1/2 -> 1/2;
    # vs ref 2: LCS 2, P = 1, R = 1/2 -> 2/3; vs ref 3: 0. The maximum, 2/3, comes from ref 2
    assert compute_metrics(["cat sat"], refs) == {"exact_match": 0.0, "rougeL": 66.6667}
    # stems "sit cat" on both sides of ref 2 -> 1.0, better than ref 1 "cats" (P 1/2, R 1 -> 2/3)
    assert compute_metrics(["sitting cats"], [["cats", "sit cat"]]) == {"exact_match": 0.0, "rougeL": 100.0}


def test_mean_rounding_and_missing_predictions():
    preds = ["a", "b", None]  # None: missing, scored as ""
    refs = [["a"], ["c"], ["d"]]
    assert compute_metrics(preds, refs) == {"exact_match": 33.3333, "rougeL": 33.3333}
    # 2/3 -> 66.6667 (rounded, not truncated)
    assert compute_metrics(["a", "b", "x"], [["a"], ["b"], ["y"]]) == {"exact_match": 66.6667, "rougeL": 66.6667}
    # rounded to 4 decimals: mean of 1/7 ROUGE = 14.285714... -> 14.2857
    assert compute_metrics(["one"], [["one two three four five six seven eight nine ten eleven twelve thirteen"]])[
        "rougeL"
    ] == round(100 * 2 * (1 * 1 / 13) / (1 + 1 / 13), 4)
    assert compute_metrics([], []) == {"exact_match": 0.0, "rougeL": 0.0}


def test_whitespace_around_predictions_does_not_matter():
    # Tk-Instruct strips predictions, the official script does not: the scores agree either way
    refs = [["New Delhi"], ["the cat sat"]]
    assert compute_metrics(["  new delhi\n", " cat sat "], refs) == compute_metrics(["new delhi", "cat sat"], refs)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        compute_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a list"):
        compute_metrics(["a"], ["a"])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        compute_metrics(["a", "b"], [["a"], []])


def test_one_scorer_is_reused():
    assert sni._rouge_scorer() is sni._rouge_scorer()


def test_agrees_with_rouge_score_on_sni_strings(sni_dir, oracle):
    # predictions: another instance's answer of the same task, the task's positive example output, or a
    # reference itself; many multi-reference instances (task102 has 3 references per instance)
    preds, refs = [], []
    for name in ("task102_commongen_sentence_generation", "task1557_jfleg_answer_generation",
                 "task957_e2e_nlg_text_generation_generate", "task1564_triviaqa_answer_generation"):
        recs = load_task(sni_dir / "tasks" / f"{name}.json", max_num_instances=15)
        for i, rec in enumerate(recs):
            choice = i % 3
            if choice == 0:
                preds.append(recs[(i + 1) % len(recs)]["references"][0])
            elif choice == 1:
                preds.append(rec["positive_examples"][0]["output"])
            else:
                preds.append(rec["references"][-1].upper())
            refs.append(rec["references"])
    for p, rs in zip(preds, refs):
        assert max(rouge_l(p, r) for r in rs) == max(oracle(p, r) for r in rs)
    got = compute_metrics(preds, refs)
    assert got == official(preds, refs, oracle)
    assert 0 < got["rougeL"] < 100 and 0 < got["exact_match"] < 100


def test_agrees_with_rouge_score_on_c4_strings(c4_dir, oracle):
    with gzip.open(c4_dir / "c4-validation.sample.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"] for _ in range(12)]
    preds, refs = [], []
    for i, doc in enumerate(docs):
        words = doc.split()[:60]
        preds.append(" ".join(words[::2] + words[-5:]))  # a noisy paraphrase of the document's start
        other = docs[(i + 1) % len(docs)].split()[:40]
        refs.append([" ".join(words[:40]), " ".join(other)])
    for p, rs in zip(preds, refs):
        for r in rs:
            assert rouge_l(p, r) == oracle(p, r)
    assert compute_metrics(preds, refs) == official(preds, refs, oracle)


def test_grouped_metrics():
    preds = ["a", "b", "c", "x", None]
    refs = [["a"], ["z"], ["c"], ["x y"], ["q"]]
    groups = ["t1", "t1", "t2", "t2", "t3"]
    got = compute_grouped_metrics(preds, refs, groups)
    # t1: EM 1/2, ROUGE 1/2; t2: EM 1/2, ROUGE (1 + 2/3)/2 ("x" vs "x y": P 1, R 1/2); t3: missing -> 0
    assert got == {
        "exact_match_for_t1": 50.0, "rougeL_for_t1": 50.0,
        "exact_match_for_t2": 50.0, "rougeL_for_t2": round(100 * (1 + 2 / 3) / 2, 4),
        "exact_match_for_t3": 0.0, "rougeL_for_t3": 0.0,
    }
    assert list(got)[:2] == ["exact_match_for_t1", "rougeL_for_t1"]  # groups in first-seen order
    with pytest.raises(ValueError, match="same length"):
        compute_grouped_metrics(preds, refs, groups[:-1])


def test_category_group_names():
    assert category_group("Title Generation") == "title_generation"
    assert category_group("Cause  Effect\tClassification") == "cause_effect_classification"
    assert category_group("Misc.") == "misc."


def test_evaluate_sni_overall_is_micro_average_and_prints_table(capsys):
    # task A: 3 instances all right; task B: 1 instance wrong. Micro average 75, mean of task means would be 50.
    preds = ["yes", "no", "yes", "maybe"]
    refs = [["yes"], ["no"], ["yes"], ["never"]]
    tasks = ["task1_a", "task1_a", "task1_a", "task2_b"]
    cats = ["Answer Verification", "Answer Verification", "Answer Verification", "Misc."]
    got = evaluate_sni(preds, refs, tasks, cats, print_table=True)
    assert got["exact_match"] == 75.0 and got["rougeL"] == 75.0
    assert got["rougeL_for_answer_verification"] == 100.0 and got["exact_match_for_misc."] == 0.0
    assert got["rougeL_for_task1_a"] == 100.0 and got["rougeL_for_task2_b"] == 0.0
    out = capsys.readouterr().out
    assert out == format_table(got, tasks=tasks, categories=cats) + "\n"
    lines = out.splitlines()
    assert re.match(r"overall\s+4\s+75\.00\s+75\.00$", next(l for l in lines if l.startswith("overall")))
    assert re.match(r"task1_a\s+3\s+100\.00\s+100\.00$", next(l for l in lines if l.startswith("task1_a")))
    assert re.match(r"answer_verification\s+3\s+100\.00\s+100\.00$", next(l for l in lines if l.startswith("answer_")))
