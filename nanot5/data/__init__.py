"""Pre-training data: text sources, tokenizers, packing and T5 span corruption."""

from nanot5.data.span_corruption import compute_lengths, span_corrupt

LABEL_PAD = -100  # label of target positions the loss ignores (padding): cross_entropy's ignore_index

__all__ = ["compute_lengths", "span_corrupt", "LABEL_PAD"]
