"""Pre-training data: text sources, tokenizers, packing and T5 span corruption."""

from nanot5.data.span_corruption import compute_lengths, span_corrupt

__all__ = ["compute_lengths", "span_corrupt"]
