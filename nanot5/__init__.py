"""nanot5: small, fast, readable pre-training and fine-tuning of T5 encoder-decoders."""

__version__ = "0.1.0"

from nanot5.model import T5, T5Config  # noqa: E402

__all__ = ["T5", "T5Config", "__version__"]
