"""What a run reports: the ``metrics.jsonl`` log and the one-line dev summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL; one object per line, flushed so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, event: str, **values: Any) -> None:
        self._f.write(json.dumps({"event": event, **values}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def dev_line(dev: dict[str, Any]) -> str:
    """One line for a validation result: loss, WER and each head's top-1 accuracy (%)."""
    acc = "/".join(f"{100 * a:.1f}" for a in dev.get("dev_head_acc", ()))
    line = f"dev loss {dev['dev_loss']:.3f} WER {100 * dev['dev_wer']:.1f}%"
    return f"{line} head acc {acc}%" if acc else line
