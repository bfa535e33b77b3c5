"""Utterance manifests: NeMo-style JSONL (and Lhotse cut manifests), validated row by row.

A NeMo manifest holds one JSON object per line::

    {"audio_filepath": "wavs/a.wav", "text": "Hello there.", "duration": 1.93,
     "speaker": "lj", "voice": "en-us", "source": "ljspeech", "id": "LJ001-0002"}

``audio_filepath`` may be relative: it is resolved against the folder holding the manifest, so
a data folder can be moved as a whole. ``offset`` (seconds, NeMo's key) marks a segment of a
longer file. ``id`` is optional; without it the audio path (plus offset) identifies the row.
Other keys are kept in ``Utterance.extra``.

Why validate everything up front: a bad row found mid-training costs an epoch, and fixing rows
one error at a time costs a day. ``check_manifest`` therefore reads every line and returns *all*
problems with their line numbers: malformed JSON, missing or mistyped keys, empty text (or text
with no words after ``normalize``), missing or unreadable audio, a duration further than
``duration_tolerance`` from the file's, and duplicate ids. ``load_manifest`` raises one
:class:`ManifestError` listing them unless ``skip_bad=True``, which keeps the valid rows.

A Lhotse cut manifest (JSONL, optionally gzipped) is recognised by its first row and read
through ``lhotse`` when it is installed (``pip install speechllama[lhotse]``); each single-file
cut becomes one ``Utterance`` (offset = cut start, text = its supervisions joined). Lhotse
resolves relative paths against the working directory, and so do we for those manifests.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechllama.audio import AudioError, audio_duration
from speechllama.text import normalize

__all__ = [
    "ManifestCheck",
    "ManifestError",
    "RowProblem",
    "Utterance",
    "check_manifest",
    "load_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("audio_filepath", "text", "duration")
_OPTIONAL_STR_KEYS = ("speaker", "voice", "source", "id")
DEFAULT_DURATION_TOLERANCE = 0.1
"""Seconds a row's ``duration`` may differ from its file's before the row counts as bad: more
than rounding, less than a wrong file (a 0.1 s shift is already a syllable)."""
_SHOWN_IN_MESSAGE = 5


@dataclass(frozen=True)
class Utterance:
    """One validated row. ``audio_filepath`` is absolute (a ``str``, so rows serialise as-is)."""

    audio_filepath: str
    text: str
    duration: float
    offset: float = 0.0
    speaker: str | None = None
    voice: str | None = None
    source: str | None = None
    id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """What makes a row unique: its ``id``, else its audio path and offset."""
        if self.id is not None:
            return self.id
        return self.audio_filepath if not self.offset else f"{self.audio_filepath}@{self.offset:g}"

    def to_json(self, base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The manifest row; the path is written relative to ``base_dir`` when it lies below it."""
        path = self.audio_filepath
        if base_dir is not None:
            rel = os.path.relpath(path, os.path.abspath(base_dir))
            if not rel.startswith(os.pardir):
                path = rel
        row: dict[str, Any] = {
            "audio_filepath": path,
            "text": self.text,
            "duration": round(self.duration, 4),
        }
        if self.offset:
            row["offset"] = round(self.offset, 4)
        for key in _OPTIONAL_STR_KEYS:
            value = getattr(self, key)
            if value is not None:
                row[key] = value
        row.update({k: v for k, v in self.extra.items() if k not in row})
        return row


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ManifestCheck:
    """Everything ``check_manifest`` found: the valid rows in file order and every problem."""

    path: str
    utterances: tuple[Utterance, ...]
    problems: tuple[RowProblem, ...]
    rows: int

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def hours(self) -> float:
        return sum(u.duration for u in self.utterances) / 3600


class ManifestError(ValueError):
    """Bad rows in a manifest. ``str()`` is one line (path, count, the first few problems);
    ``problems`` holds all of them for a full report."""

    def __init__(self, path: str | os.PathLike[str], problems: Iterable[RowProblem], rows: int):
        self.path = str(path)
        self.problems = tuple(problems)
        self.rows = rows
        shown = "; ".join(str(p) for p in self.problems[:_SHOWN_IN_MESSAGE])
        more = len(self.problems) - _SHOWN_IN_MESSAGE
        tail = f"; ... and {more} more (`speechllama data validate` lists all)" if more > 0 else ""
        n = len(self.problems)
        super().__init__(f"{self.path}: {n} bad row{'s' * (n != 1)} of {rows}: {shown}{tail}")


class _RowError(Exception):
    """Internal: why one row is bad (becomes a RowProblem with the line number)."""


def _string(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(f"'{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def _utterance(
    row: Any, base_dir: Path, check_audio: bool, tolerance: float, max_seconds: float | None
) -> Utterance:
    """Validate one parsed row. Cheap checks first, so a row with a typo costs no file access."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise _RowError("missing key" + "s" * (len(missing) > 1) + " " + ", ".join(missing))
    path_value = row["audio_filepath"]
    if not isinstance(path_value, str) or not path_value.strip():
        raise _RowError("'audio_filepath' must be a non-empty string")
    text = row["text"]
    if not isinstance(text, str):
        raise _RowError(f"'text' must be a string, got {type(text).__name__}")
    for key, value in (("audio_filepath", path_value), ("text", text)):
        bad = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:  # JSON "\ud800" escapes decode to these; UTF-8 cannot hold them
            raise _RowError(f"'{key}' holds a lone surrogate U+{ord(bad):04X} (not valid text)")
    if not text.strip():
        raise _RowError("empty text")
    if not normalize(text):
        raise _RowError(f"text {text!r} has no words after normalisation")
    duration = _number(row, "duration")
    if duration is None or duration <= 0:
        raise _RowError(f"'duration' must be positive, got {row['duration']!r}")
    offset = _number(row, "offset") or 0.0
    if offset < 0:
        raise _RowError(f"'offset' must not be negative, got {offset:g}")
    strings = {k: _string(row, k) for k in _OPTIONAL_STR_KEYS}
    path = Path(os.path.expanduser(path_value))
    path = path if path.is_absolute() else base_dir / path
    path = Path(os.path.abspath(path))
    if check_audio:
        try:
            file_seconds = audio_duration(path)
        except AudioError as exc:
            raise _RowError(f"audio {exc}") from None
        if offset:
            if offset + duration > file_seconds + tolerance:
                raise _RowError(
                    f"segment {offset:g}+{duration:g} s runs past the end of {path} "
                    f"({file_seconds:.3f} s)"
                )
        elif abs(duration - file_seconds) > tolerance:
            raise _RowError(
                f"duration {duration:g} s but {path} lasts {file_seconds:.3f} s "
                f"(tolerance {tolerance:g} s)"
            )
    if max_seconds is not None and duration > max_seconds:
        raise _RowError(f"duration {duration:g} s exceeds the {max_seconds:g} s limit")
    extra = {k: v for k, v in row.items() if k not in (*REQUIRED_KEYS, "offset", *strings)}
    return Utterance(str(path), text, duration, offset, **strings, extra=extra)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or why the line is unusable) for every non-blank line.

    Bytes are decoded line by line, so one line that is not UTF-8 is one bad row rather than
    an unreadable manifest (a byte-order mark on the first line is ignored)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield number, _RowError(f"not UTF-8 text (byte {exc.start + 1} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    what = exc.msg.removesuffix(" at")  # "Invalid control character at"
                    yield number, _RowError(f"malformed JSON ({what} at column {exc.colno})")
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise OSError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _is_lhotse_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and "audio_filepath" not in row
        and ("recording" in row or row.get("type") in ("MonoCut", "MultiCut", "MixedCut"))
    )


def _lhotse_row(obj: dict[str, Any]) -> dict[str, Any]:
    """One Lhotse cut (as JSON) -> a NeMo-style row that the common validation understands."""
    try:
        from lhotse.serialization import deserialize_item
    except ImportError:
        raise _RowError("Lhotse cut manifest: install lhotse to read it") from None
    try:
        cut = deserialize_item(obj)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise _RowError(f"not a valid Lhotse cut ({type(exc).__name__}: {exc})") from None
    recording = getattr(cut, "recording", None)
    if recording is None or len(recording.sources) != 1 or recording.sources[0].type != "file":
        raise _RowError(f"cut {cut.id}: only single-file recordings are supported")
    supervisions = list(cut.supervisions)
    return {
        "audio_filepath": os.path.abspath(recording.sources[0].source),
        "text": " ".join(s.text for s in supervisions if s.text),
        "duration": cut.duration,
        "offset": cut.start,
        "id": cut.id,
        "speaker": next((s.speaker for s in supervisions if s.speaker), None),
    }


def check_manifest(
    path: str | os.PathLike[str],
    *,
    check_audio: bool = True,
    duration_tolerance: float = DEFAULT_DURATION_TOLERANCE,
    max_seconds: float | None = None,
) -> ManifestCheck:
    """Read and validate every row of a NeMo (or Lhotse cut) manifest; never raises for a bad
    row, only for an unreadable file. ``check_audio=False`` skips opening the audio files (fast,
    for manifests written by our own tools). ``max_seconds`` rejects longer utterances."""
    path = Path(path)
    base_dir = Path(os.path.abspath(path)).parent
    good: list[Utterance] = []
    problems: list[RowProblem] = []
    first_line: dict[str, int] = {}
    rows = 0
    lhotse: bool | None = None
    for number, row in _json_rows(path):
        rows += 1
        if isinstance(row, _RowError):
            problems.append(RowProblem(number, str(row)))
            continue
        if lhotse is None:
            lhotse = _is_lhotse_row(row)
        try:
            if lhotse and isinstance(row, dict):
                row = _lhotse_row(row)
            utt = _utterance(row, base_dir, check_audio, duration_tolerance, max_seconds)
        except _RowError as exc:
            problems.append(RowProblem(number, str(exc)))
            continue
        if utt.key in first_line:
            what = "id" if utt.id is not None else "audio"
            first = first_line[utt.key]
            message = f"duplicate {what} {utt.key!r} (first on line {first})"
            problems.append(RowProblem(number, message))
            continue
        first_line[utt.key] = number
        good.append(utt)
    return ManifestCheck(str(path), tuple(good), tuple(problems), rows)


def load_manifest(
    path: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    check_audio: bool = True,
    duration_tolerance: float = DEFAULT_DURATION_TOLERANCE,
    max_seconds: float | None = None,
) -> list[Utterance]:
    """Valid utterances of a manifest, in file order.

    Raises :class:`ManifestError` naming every bad row, unless ``skip_bad`` is true: then the
    bad rows are logged as one warning and the rest are returned. An empty manifest is an error
    either way, since training or scoring on nothing is always a mistake.
    """
    check = check_manifest(
        path,
        check_audio=check_audio,
        duration_tolerance=duration_tolerance,
        max_seconds=max_seconds,
    )
    if check.problems and not skip_bad:
        raise ManifestError(path, check.problems, check.rows)
    if check.problems:
        log.warning("%s", ManifestError(path, check.problems, check.rows))
    if not check.utterances:
        raise ManifestError(path, [RowProblem(0, "no valid rows")], check.rows)
    return list(check.utterances)


def write_manifest(
    utterances: Iterable[Utterance], path: str | os.PathLike[str], *, relative: bool = True
) -> int:
    """Write rows as JSONL (UTF-8, one object per line); returns the count. With ``relative``,
    audio paths below the manifest's folder are written relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent if relative else None
    count = 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for utt in utterances:
            f.write(json.dumps(utt.to_json(base), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)  # readers never see a half-written manifest
    return count
