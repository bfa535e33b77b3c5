"""A locked set of real English sentences: the Asterisk voice prompts packaged by Debian.

The accuracy campaign needs real sentence recordings that were never used to choose anything.
real-smoke's 47 are looked at all the time, and fsdd-locked is digits only. Debian packages
the Asterisk PBX's English prompts:
- ``asterisk-core-sounds-en-wav``: 568 wavs, 8 kHz telephone band, all read by one professional
  US-English speaker (Allison Smith), CC-BY-SA-3.0;
- ``asterisk-core-sounds-en``: their transcripts, in ``core-sounds-en.txt.gz``, one
  ``name: text`` line each.

They are real read speech in a voice and a domain (phone menus) that no training run hears.
Recipes fetch them with ``apt-get download`` (no root needed); nothing here downloads.

A prompt is kept when it is a sentence the WER can score as written:
- at least ``min_words`` words;
- no digits or keypad symbols: the text says "press 1" or "#" where the voice may say "one",
  "pound" or "hash";
- no bracketed notes ("[ascending tones]", "(note: ...)"), which describe sounds, not words;
- at most ``MAX_SECONDS`` of audio, the cap on one utterance.

The selection is a TSV that ``data/tsv.py`` imports like the shared ones, so durations and
bad files are handled in one place.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from speechllama.audio import MAX_SECONDS, AudioError, audio_duration

__all__ = ["Selection", "find_transcripts", "reject_reason", "write_tsv"]

SPEAKER = "Allison Smith"
SOURCE = "Asterisk core sounds en 1.6.1 (Debian asterisk-core-sounds-en-wav), Allison Smith"
LICENSE = "CC-BY-SA-3.0"
TRANSCRIPTS = "core-sounds-en.txt"

_UNSCORABLE = re.compile(r"[0-9#*\[\]()<>{}=+@/\\]")


@dataclass(frozen=True)
class Selection:
    """What ``write_tsv`` kept and why the other transcribed prompts were left out."""

    tsv: Path
    kept: int
    dropped: dict[str, int]


def find_transcripts(root: Path) -> Path:
    """``core-sounds-en.txt`` or its ``.gz`` anywhere below ``root`` (an extracted .deb, or the
    folder of Asterisk's own release tarball)."""
    for name in (TRANSCRIPTS + ".gz", TRANSCRIPTS):
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    raise FileNotFoundError(f"{root}: no {TRANSCRIPTS}[.gz] below it (asterisk-core-sounds-en)")


def _read_transcripts(path: Path) -> dict[str, str]:
    """``name -> text``; comment lines start with ``;``."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable transcript list ({exc})") from exc
    out: dict[str, str] = {}
    for line in lines:
        name, sep, text = line.partition(":")
        if sep and name.strip() and not line.lstrip().startswith(";"):
            out[name.strip()] = " ".join(text.split())
    return out


def _sounds_root(root: Path) -> Path:
    """The folder that holds most of the wavs: prompt names (``dictate/pause``) are relative to
    it."""
    wavs = list(root.rglob("*.wav"))
    if not wavs:
        raise FileNotFoundError(f"{root}: no .wav files below it (asterisk-core-sounds-en-wav)")
    parents = Counter(w.parent for w in wavs)
    return parents.most_common(1)[0][0]


def reject_reason(text: str, min_words: int) -> str | None:
    """Why a prompt's text cannot be scored as written, or None when it can."""
    if _UNSCORABLE.search(text):
        return "digits, symbols or notes"
    if len(text.split()) < min_words:
        return f"fewer than {min_words} words"
    return None


def write_tsv(
    root: str | os.PathLike[str], out_tsv: str | os.PathLike[str], *, min_words: int = 5
) -> Selection:
    """Choose the scorable prompts under ``root`` and write them as a ``manifest.tsv`` (columns
    path, text, id, speaker, source, license; absolute audio paths), sorted by prompt name."""
    root = Path(root)
    prompts = _read_transcripts(find_transcripts(root))
    sounds = _sounds_root(root)
    dropped: Counter[str] = Counter()
    rows: list[dict[str, str]] = []
    for name, text in sorted(prompts.items()):
        reason = reject_reason(text, min_words)
        wav = sounds / f"{name}.wav"
        if reason is None and not wav.is_file():
            reason = "no wav"
        if reason is None:
            try:
                if audio_duration(wav) > MAX_SECONDS:
                    reason = f"longer than {MAX_SECONDS:g} s"
            except AudioError:
                reason = "unreadable wav"
        if reason is not None:
            dropped[reason] += 1
            continue
        rows.append(
            {
                "path": str(wav.resolve()),
                "text": text,
                "id": name.replace("/", "_"),
                "speaker": SPEAKER,
                "source": SOURCE,
                "license": LICENSE,
            }
        )
    if not rows:
        raise ValueError(f"{root}: no scorable prompt with at least {min_words} words")
    out = Path(out_tsv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=list(rows[0]),
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
            lineterminator="\n",
            escapechar="\\",
        )
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    return Selection(out, len(rows), dict(dropped))
