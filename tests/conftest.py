"""Fixtures shared by several test files (plain helpers live in ``helpers.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import ragged_batch


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Ragged audio (7, 4, 2 embeddings) and ragged text (6, 3, 5 tokens incl. BOS); built once
    per test module, so a module that mutates it cannot reach another."""
    return ragged_batch()
