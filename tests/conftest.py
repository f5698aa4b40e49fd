"""Shared fixtures. Test data lives in the repository (tests/data, see its README): no network, nothing from outside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEST_DATA = Path(__file__).resolve().parent / "data"

# Test models are tiny: one thread avoids OpenMP overhead (and stalls on a shared, oversubscribed machine);
# subprocesses the tests start get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def t5_tokenizer_dir(test_data: Path) -> Path:
    return test_data / "t5-tokenizer"


@pytest.fixture(scope="session")
def c4_dir(test_data: Path) -> Path:
    return test_data / "c4"


@pytest.fixture(scope="session")
def sni_dir(test_data: Path) -> Path:
    return test_data / "sni"
