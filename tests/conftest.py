"""Fixtures shared by several test files (plain helpers live in ``helpers.py``)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import ragged_batch

# Decoder calls on oneDNN's packed weights at every size, not the measured per-machine choice
# (``speechllama.model.packed``): a test must not depend on timing, and packed rows do not
# depend on the row count, so the lossless strategies reproduce greedy bit for bit.
os.environ.setdefault("SPEECHLLAMA_PACK", "always")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Ragged audio (7, 4, 2 embeddings) and ragged text (6, 3, 5 tokens incl. BOS); built once
    per test module, so a module that mutates it cannot reach another."""
    return ragged_batch()
