"""Generic generation metrics (nanot5.metrics.compute_generation_metrics).

Oracles: hand-computed values (normalised exact match, LCS-based ROUGE-L, BLEU's n-gram precisions and brevity
penalty written out) and the reference packages themselves (`sacrebleu`, `rouge_score`) called directly.
"""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from nanot5.metrics import GENERATION_METRICS, compute_generation_metrics, label_match


def test_exact_match_normalised_and_max_over_references():
    preds = ["The Cat!", "a dog", "Paris", None]
    refs = ["the cat", ["cat", "A  dog."], "London", [""]]
    # 1 (case+punctuation ignored), 1 (second reference), 0, 1 (missing prediction == "")
    assert compute_generation_metrics(preds, refs, ["exact_match"]) == {"exact_match": 75.0}


def test_rouge_l_hand_computed_and_oracle():
    # tokens: the cat sat | the cat was sat -> LCS 3, P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7
    got = compute_generation_metrics(["the cat sat"], [["the cat was sat"]], ["rougeL"])
    assert got == {"rougeL": round(100 * 6 / 7, 4)}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds = ["running quickly home", "a b"]
    refs = [["he runs home quick", "running home"], ["c d"]]
    want = sum(max(scorer.score(target=r, prediction=p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, refs))
    assert compute_generation_metrics(preds, refs, ["rougeL"])["rougeL"] == round(100 * want / 2, 4)


def test_accuracy_is_stripped_string_equality():
    assert label_match(" positive\n", "positive") and not label_match("Positive", "positive")
    preds = ["positive", "Negative", "neutral.", " 3 "]
    refs = ["positive", "negative", "neutral", ["2", "3"]]
    assert compute_generation_metrics(preds, refs, ["accuracy"]) == {"accuracy": 50.0}
    # exact_match forgives case and punctuation where accuracy does not
    assert compute_generation_metrics(preds, refs, ["exact_match"]) == {"exact_match": 100.0}


def test_bleu_hand_computed():
    # every n-gram precision is 1 (4/4, 3/3, 2/2, 1/1); hypothesis 4 tokens, reference 6: BP = exp(1 - 6/4)
    got = compute_generation_metrics(["a b c d"], ["a b c d e f"], ["bleu"])["bleu"]
    assert got == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-4)
    # with a second reference of length 4 the closest reference length is 4: no brevity penalty
    assert compute_generation_metrics(["a b c d"], [["a b c d e f", "a b c d"]], ["bleu"])["bleu"] == 100.0
    assert compute_generation_metrics(["x y z w"], ["a b c d"], ["bleu"])["bleu"] == 0.0


def test_bleu_equals_sacrebleu_with_variable_reference_counts():
    preds = ["the cat is on the mat", "there is a cat here", "hello world , again", "completely unrelated"]
    refs = [["the cat sat on the mat", "a cat is on the mat"], ["there is a cat on the mat"],
            ["hello world again", "hello , world , again", "hi world"], ["nothing in common at all"]]
    streams = [  # sacrebleu's multi-reference layout, written out: None where an instance has fewer references
        ["the cat sat on the mat", "there is a cat on the mat", "hello world again", "nothing in common at all"],
        ["a cat is on the mat", None, "hello , world , again", None],
        [None, None, "hi world", None],
    ]
    want = sacrebleu.corpus_bleu(preds, streams).score
    assert 0 < want < 100
    assert compute_generation_metrics(preds, refs, ["bleu"])["bleu"] == round(want, 4)
    # corpus BLEU is not a mean of sentence scores: one long good sentence outweighs a short bad one
    assert compute_generation_metrics(preds[:1], refs[:1], ["bleu"])["bleu"] == round(
        sacrebleu.corpus_bleu(preds[:1], [[r] for r in refs[0]]).score, 4)


def test_all_metrics_order_empty_and_errors():
    got = compute_generation_metrics(["one two three four"], ["one two three four"], list(GENERATION_METRICS))
    assert list(got) == list(GENERATION_METRICS) and set(got.values()) == {100.0}
    # sacrebleu's BLEU needs 4-grams: a one-word match scores 0 (no effective-order smoothing)
    assert compute_generation_metrics(["a"], ["a"], ["bleu"]) == {"bleu": 0.0}
    assert compute_generation_metrics([], [], ["bleu", "accuracy"]) == {"bleu": 0.0, "accuracy": 0.0}
    with pytest.raises(ValueError, match="unknown metric.*'meteor'.*exact_match, rougeL, bleu, accuracy"):
        compute_generation_metrics(["a"], ["a"], ["meteor"])
    with pytest.raises(ValueError, match="2 predictions for 1 reference"):
        compute_generation_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        compute_generation_metrics(["a"], [[]])
