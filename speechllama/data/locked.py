"""A locked evaluation set carved out of FSDD's training split.

The accuracy campaign needs real speech that was never used to choose anything. The only real
sentence recordings here are real-smoke's 47, which are looked at all the time; so the locked
set is real digit recordings that no training run sees: for each FSDD speaker, one recording of
each digit 0-9 (60 with FSDD's 6 speakers), drawn with a fixed seed from fsdd-train and removed
from it.

Idempotent: the choice is made from fsdd-train plus the existing locked set, so running it
again (or after fsdd-train was re-imported) gives the same set and the same reduced fsdd-train.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from speechllama.resultlog import replace_rows

LOCKED = "fsdd-locked"
SOURCE = "fsdd-train"


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON-lines manifest: {exc}") from exc


def choose(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One recording per (speaker, digit text), drawn with ``seed``; in speaker, digit order.
    A speaker's only recording of a digit stays in training (so a tiny FSDD is not emptied)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["audio_filepath"]):
        groups.setdefault((str(row.get("speaker", "?")), row["text"]), []).append(row)
    return [random.Random(f"{seed}/{speaker}/{text}").choice(group)
            for (speaker, text), group in sorted(groups.items()) if len(group) > 1]  # fmt: skip


def lock_fsdd(data: Path, seed: int = 0) -> tuple[int, int]:
    """Write ``DATA/fsdd-locked/manifest.jsonl`` and remove its rows from ``DATA/fsdd-train``;
    returns (locked rows, fsdd-train rows left)."""
    train_path = data / SOURCE / "manifest.jsonl"
    locked_path = data / LOCKED / "manifest.jsonl"
    train = _rows(train_path)
    if not train:
        raise ValueError(f"{train_path}: no fsdd-train manifest to take the locked set from")
    pool = {r["audio_filepath"]: r for r in [*train, *_rows(locked_path)]}
    locked = choose(list(pool.values()), seed)
    taken = {r["audio_filepath"] for r in locked}
    # fsdd-train keeps its own row order; the locked rows go back out of it.
    left = [r for r in pool.values() if r["audio_filepath"] not in taken]
    replace_rows(locked_path, locked)
    replace_rows(train_path, left)
    return len(locked), len(left)
