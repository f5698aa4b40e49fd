"""Backward-compatible name: the official SNI metric lives in `nanot5.metrics` (generation metrics)."""

from nanot5.metrics import (  # noqa: F401
    compute_metrics,
    evaluate_sni,
    exact_match,
    normalize_answer,
    rouge_l,
)
