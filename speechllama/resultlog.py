"""Append-only JSONL result files that stay valid whenever the process is killed.

Batch jobs (``transcribe --output``, ``evaluate``) write each result the moment it exists, so a
killed job loses at most the batch in flight, and a re-run reads what is there and skips it.
Why this is safe against SIGKILL at any instant:

- each row is one ``os.write`` of a complete line to a file opened with ``O_APPEND`` (retried
  for the rest if the kernel takes only part), then ``fsync``: a row is either wholly in the file
  or, if the kill lands inside that write, a torn tail with no newline;
- readers (``read_rows``) take only complete lines and ignore a torn tail; the next writer
  (``ResultLog``) cuts the tail off before appending, so the file is valid JSONL again;
- a file rewritten as a whole (``replace_rows``) is written to a temporary sibling, synced and
  renamed over the old one, so readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["ResultLog", "read_rows", "replace_rows", "write_text_atomic"]


def read_rows(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], bool]:
    """The JSON objects on the complete lines of ``path`` (none if it does not exist), and
    whether the file ends in a torn line (a write cut short). Lines that are not JSON objects
    are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], False
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].split(b"\n")[:-1]:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, end < len(data)


def _fsync_parent(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultLog:
    """``with ResultLog(path) as log: log.append(row)``: one JSON line per row, durable on
    return (``durable=False`` skips the fsync: the row survives the process being killed but
    not the machine losing power)."""

    def __init__(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self._fd: int | None = None

    def __enter__(self) -> ResultLog:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create the file (and its folder) or cut a torn tail off it; then append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.ftruncate(fd, _last_line_end(fd, size))
            os.fsync(fd)
        self._fd = fd
        if self.durable:
            _fsync_parent(self.path)

    def append(self, row: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: result log is not open")
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.durable:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _last_line_end(fd: int, size: int) -> int:
    """Offset just past the last newline of the open file (0 if it has none)."""
    step = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - step)
        chunk = os.pread(fd, end - start, start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def replace_rows(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as the whole of ``path``, atomically (see ``write_text_atomic``)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) as the whole of ``path``: a temporary sibling, fsync, rename, so
    that a reader or a kill never meets a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_parent(path)
