"""nanot5: small, fast, readable pre-training and fine-tuning of T5 encoder-decoders.

`import nanot5` is cheap (no torch): `nanot5.T5` and `nanot5.T5Config` load the model module on
first use, so `nanot5 --help` and `--version` answer without importing torch.
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["T5", "T5Config", "NanoT5Error", "__version__"]

from nanot5.errors import NanoT5Error  # noqa: E402  (no torch)


def __getattr__(name: str):
    if name in ("T5", "T5Config"):
        from nanot5 import model

        return getattr(model, name)
    raise AttributeError(f"module 'nanot5' has no attribute {name!r}")
