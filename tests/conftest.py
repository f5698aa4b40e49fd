"""Shared fixtures. Real test data lives beside the repo in ../shared/data (never copied in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tests are small; two threads match this machine and keep runs repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def t5_tokenizer_dir(shared_data: Path) -> Path:
    return shared_data / "t5-tokenizer"


@pytest.fixture(scope="session")
def c4_dir(shared_data: Path) -> Path:
    return shared_data / "c4"


@pytest.fixture(scope="session")
def sni_dir(shared_data: Path) -> Path:
    return shared_data / "sni"
