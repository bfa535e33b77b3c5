"""The encoder cache's fingerprint must not depend on what cannot change a clean copy: fine-tuning
with another --seed re-encoded all 22.5 h of the cache (10 min) before this was fixed."""

from __future__ import annotations

from speechllama.model.config import preset
from speechllama.train.config import TrainConfig
from speechllama.train.setup import encoder_cache_parts


def _parts(**changes: object) -> dict:
    cfg = TrainConfig(train_manifest="train.jsonl", out_dir="out", **changes)
    return encoder_cache_parts(cfg, preset("small", 64))


def test_clean_cache_ignores_seed_and_augment() -> None:
    base = _parts()
    assert _parts(seed=7) == base
    assert _parts(seed=7, augment={"speed": 0.5}) == base
    assert base["seed"] == 0 and base["augment"] is None  # what caches were keyed by before


def test_augmented_copies_depend_on_seed_and_augment() -> None:
    two = _parts(cache_copies=2)
    assert _parts(cache_copies=2, seed=7) != two
    assert _parts(cache_copies=2, augment={"speed": 0.5}) != two
