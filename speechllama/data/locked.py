"""A locked evaluation set carved out of FSDD's training split.

The accuracy campaign needs real speech that was never used to choose anything. The only real
sentence recordings here are real-smoke's 47, which are looked at all the time; so the locked
set is real digit recordings that no training run sees: for each FSDD speaker, the last
recording of each digit (the highest take number, ``9_theo_49``; FSDD's test split is takes
0-4), 60 with FSDD's 6 speakers, removed from fsdd-train. The rule needs no seed and matches the
release run's "fsdd-train minus the *_49 recordings".

Idempotent: the choice is made from fsdd-train plus the existing locked set, so running it
again (or after fsdd-train was re-imported) gives the same set and the same reduced fsdd-train.
"""

from __future__ import annotations

import json
import re
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


def _take(row: dict[str, Any]) -> tuple[int, str]:
    """FSDD's take number (the trailing ``_N`` of the file name) for ordering, then the path."""
    stem = Path(row["audio_filepath"]).stem
    found = re.search(r"_(\d+)$", stem)
    return (int(found.group(1)) if found else -1, row["audio_filepath"])


def choose(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last take per (speaker, digit text), in speaker, digit order. A speaker's only
    recording of a digit stays in training (so a tiny FSDD is not emptied)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row.get("speaker", "?")), row["text"]), []).append(row)
    return [max(group, key=_take) for _, group in sorted(groups.items()) if len(group) > 1]


def lock_fsdd(data: Path) -> tuple[int, int]:
    """Write ``DATA/fsdd-locked/manifest.jsonl`` and remove its rows from ``DATA/fsdd-train``;
    returns (locked rows, fsdd-train rows left)."""
    train_path = data / SOURCE / "manifest.jsonl"
    locked_path = data / LOCKED / "manifest.jsonl"
    train = _rows(train_path)
    if not train:
        raise ValueError(f"{train_path}: no fsdd-train manifest to take the locked set from")
    pool = {r["audio_filepath"]: r for r in [*train, *_rows(locked_path)]}
    locked = choose(list(pool.values()))
    taken = {r["audio_filepath"] for r in locked}
    # fsdd-train keeps its own row order; the locked rows go back out of it.
    left = [r for r in pool.values() if r["audio_filepath"] not in taken]
    replace_rows(locked_path, locked)
    replace_rows(train_path, left)
    return len(locked), len(left)
