"""Small example data shipped inside the package (licences in README.md next to this file)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "example_manifest"]

ASSETS_DIR = Path(__file__).resolve().parent


def example_manifest() -> Path:
    """NeMo manifest of the bundled example clips: 4 LJ Speech sentences and 6 FSDD digits."""
    return ASSETS_DIR / "examples.jsonl"
