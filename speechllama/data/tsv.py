"""Import the shared ``manifest.tsv`` files (FSDD, real_en_smoke) as NeMo JSONL manifests.

The TSV needs a header with at least ``path`` (relative to the TSV's folder) and ``text``;
``id``, ``split``, ``speaker`` and ``source`` are used when present, every other column
(``license``, ``gender``, ...) is kept as an extra key. A ``split`` column gives one manifest per
split (FSDD: ``fsdd_train.jsonl``, ``fsdd_test.jsonl``), otherwise one ``<name>.jsonl``.

Audio is *referenced, not copied* by default: rows hold absolute paths into the shared folder,
so importing costs nothing and there is one copy of the data. ``copy_audio=True`` copies the
files under ``<out>/<name>/`` and writes paths relative to the manifest, for a self-contained
data folder that can be moved or shipped.

Durations always come from the audio headers (a TSV's ``duration_s`` is not trusted), and a
transcript that is a bare number (an FSDD label "7") becomes its word ("seven").
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from speechllama.audio import AudioError, audio_duration
from speechllama.data.manifest import Utterance, write_manifest
from speechllama.text import normalize

__all__ = ["ImportResult", "import_tsv"]

# Columns that become Utterance fields or are recomputed; the rest go to ``extra``.
_CONSUMED = {"id", "path", "text", "split", "speaker", "source", "duration_s", "duration"}


@dataclass(frozen=True)
class ImportResult:
    """Manifests written (split or name -> path), rows per manifest, and one line per bad row."""

    manifests: dict[str, Path]
    counts: dict[str, int]
    problems: tuple[str, ...]


def _rows(tsv: Path) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        with tsv.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = {"path", "text"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{tsv}: header lacks column(s) {', '.join(sorted(missing))}")
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise ValueError(f"{tsv}: not UTF-8 text") from None
    except OSError as exc:
        raise OSError(f"{tsv}: cannot read ({exc.strerror or exc})") from None


def _text(raw: str) -> str:
    raw = raw.strip()
    return normalize(raw) if raw.isdigit() else raw


def import_tsv(
    tsv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    copy_audio: bool = False,
) -> ImportResult:
    """Convert one ``manifest.tsv`` into JSONL manifest(s) under ``out_dir``.

    ``name`` defaults to the TSV's folder name (``fsdd``, ``real_en_smoke``). Bad rows (missing
    or unreadable audio, empty text) are reported in ``problems`` and left out; the others are
    written, so one broken file does not block an import.
    """
    tsv = Path(tsv_path)
    root = Path(os.path.abspath(tsv)).parent
    name = name or root.name
    out = Path(out_dir)
    by_split: dict[str, list[Utterance]] = {}
    problems: list[str] = []
    for line, row in _rows(tsv):
        where = f"{tsv}:{line}"
        rel = (row.get("path") or "").strip()
        text = _text(row.get("text") or "")
        if not rel or not text:
            problems.append(f"{where}: empty {'path' if not rel else 'text'}")
            continue
        src = root / rel
        try:
            duration = audio_duration(src)
        except AudioError as exc:
            problems.append(f"{where}: {exc}")
            continue
        audio = src
        if copy_audio:
            audio = out / name / rel
            audio.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, audio)
        extra = {k: v for k, v in row.items() if k not in _CONSUMED and k and v not in (None, "")}
        utt = Utterance(
            audio_filepath=os.path.abspath(audio),
            text=text,
            duration=duration,
            speaker=row.get("speaker") or None,
            source=row.get("source") or name,
            id=row.get("id") or Path(rel).stem,
            extra=extra,
        )
        by_split.setdefault((row.get("split") or "").strip(), []).append(utt)
    manifests: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for split, utts in sorted(by_split.items()):
        key = split or name
        path = out / (f"{name}_{split}.jsonl" if split else f"{name}.jsonl")
        counts[key] = write_manifest(utts, path, relative=copy_audio)
        manifests[key] = path
    return ImportResult(manifests, counts, tuple(problems))
