"""Training sentences for synthesis: normalise, split or drop long ones, deduplicate, remove
every sentence of the test sets, and hold out a fixed synthetic test set.

Pipeline (``prepare_sentences``), in this order:

1. Each corpus line is normalised with ``speechllama.text.normalize``. A sentence longer than
   ``max_words`` is split at its clause punctuation (``. ; : ! ?``, then commas) and the clauses
   are packed greedily into pieces of at most ``max_words``; a clause that alone is still too
   long is dropped, and so is a piece shorter than ``min_words``. The default limit is 24
   words: espeak-ng at its default rate speaks 24 of them in 5.9 s (median of 20 sentences
   measured here), slower voices take longer. Why a limit: synthesis and training cost grow
   with length, a batch is padded to its longest item, and the shared corpora have long tails
   (KJV verses: 25.4 words on average, up to 90; LJSpeech transcripts: 17.0, up to 39).
2. Deduplicate on the normalised text, keeping the first occurrence (corpora in the order given).
3. Drop every sentence that is in a test set, after normalisation: exact matches, and for
   sentences of at least ``overlap_words`` words, containment either way (a test sentence inside
   a longer training piece, or a split piece of a test sentence). Whole lines are checked before
   splitting, so no short fragment of a test sentence survives either.
4. Hold out ``heldout_size`` sentences for the synthetic test and ``dev_size`` for dev: the
   sentences with the smallest ``blake2b(seed, sentence)``. That is deterministic for a seed and
   stable when a corpus is added (a held-out sentence only leaves the set if a new sentence
   ranks below it), unlike a shuffle whose result changes with every input.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from speechllama.text import normalize, read_lines

__all__ = [
    "TextPrepOptions",
    "TextPrepStats",
    "TextSplits",
    "prepare_sentences",
    "prepare_text",
    "read_corpus",
    "read_test_sentences",
    "split_sentence",
]

_STRONG_RE = re.compile(r"(?<=[.;:!?])[\"')\]]*\s+")
_COMMA_RE = re.compile(r"(?<=,)\s+")
# A "." after these does not end a clause ("Mr. Neild", "St. Paul").
_ABBREV_RE = re.compile(r"\b(?:mr|mrs|ms|dr|st|prof|messrs|no|vs|etc|i\.e|e\.g)\.$", re.IGNORECASE)


@dataclass(frozen=True)
class TextPrepOptions:
    max_words: int = 24
    min_words: int = 2
    heldout_size: int = 500
    dev_size: int = 500
    seed: int = 0
    overlap_words: int = 4


@dataclass(frozen=True)
class TextPrepStats:
    """What happened to the input (every count is of sentences or pieces, never words)."""

    lines: int
    split: int  # long lines cut into pieces
    pieces: int  # pieces after splitting (kept lines count as one piece)
    dropped_long: int  # clauses over max_words that could not be split
    dropped_short: int  # lines with fewer than min_words words (empty lines included)
    duplicates: int
    in_test_sets: int
    train: int
    dev: int
    heldout: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TextSplits:
    train: tuple[str, ...]
    dev: tuple[str, ...]
    heldout: tuple[str, ...]


def _clauses(text: str) -> list[str]:
    """Split raw text after clause punctuation, re-joining splits after abbreviations."""
    out: list[str] = []
    for part in _STRONG_RE.split(text.strip()):
        if out and _ABBREV_RE.search(out[-1]):
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    return out


def split_sentence(text: str, max_words: int = 24, min_words: int = 2) -> tuple[list[str], int]:
    """Normalised pieces of one raw sentence, each of ``min_words..max_words`` words, and the
    number of clauses dropped as too long. Short sentences come back whole."""
    return _split(text, normalize(text), max_words, min_words)


def _split(text: str, whole: str, max_words: int, min_words: int) -> tuple[list[str], int]:
    n = len(whole.split())
    if n <= max_words:
        return ([whole] if n >= min_words else []), 0
    units: list[str | None] = []  # normalised clauses; None marks a dropped, too-long clause
    for clause in _clauses(text):
        normal = normalize(clause)
        if len(normal.split()) <= max_words:
            units.append(normal)
            continue
        for sub in _COMMA_RE.split(clause):
            normal = normalize(sub)
            units.append(normal if len(normal.split()) <= max_words else None)
    pieces: list[str] = []
    current: list[str] = []
    count = 0
    for unit in [*units, None]:  # None also flushes the last piece
        words = len(unit.split()) if unit else 0
        if unit is None or count + words > max_words:
            if count >= min_words:
                pieces.append(" ".join(current))
            current, count = [], 0
        if unit:
            current.append(unit)
            count += words
    return pieces, sum(u is None for u in units)


def read_corpus(path: str | os.PathLike[str]) -> Iterator[str]:
    """Raw sentences of a corpus file: one per line; in ``.tsv`` files (``id<TAB>text``, like the
    LJSpeech transcripts) the last column."""
    tsv = ".tsv" in Path(path).suffixes
    for line in read_lines(path):
        line = line.rstrip("\n")
        yield line.rsplit("\t", 1)[-1] if tsv else line


def read_test_sentences(path: str | os.PathLike[str]) -> list[str]:
    """Reference sentences of a test set: the ``text`` column of a ``.tsv`` with a header, the
    ``text`` key of a JSONL manifest, or every line of a plain text file."""
    path = Path(path)
    if ".jsonl" in path.suffixes:
        texts = []
        for number, line in enumerate(read_lines(path), start=1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{number}: not a manifest row with 'text'") from None
        return texts
    if ".tsv" in path.suffixes:
        reader = csv.DictReader(read_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
        if "text" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: TSV header has no 'text' column")
        return [row["text"] or "" for row in reader]
    return [line.rstrip("\n") for line in read_lines(path)]


class _TestSetIndex:
    """Normalised test sentences, with an n-gram index for cheap containment checks."""

    def __init__(self, sentences: Iterable[str], n: int) -> None:
        self.n = n
        self.exact = {s for s in (normalize(t) for t in sentences) if s}
        self.by_ngram: dict[tuple[str, ...], list[str]] = {}
        for sentence in self.exact:
            words = sentence.split()
            for i in range(len(words) - n + 1):
                self.by_ngram.setdefault(tuple(words[i : i + n]), []).append(sentence)

    def __contains__(self, sentence: str) -> bool:
        if sentence in self.exact:
            return True
        words = sentence.split()
        if len(words) < self.n:
            return False
        padded = f" {sentence} "
        for i in range(len(words) - self.n + 1):
            for test in self.by_ngram.get(tuple(words[i : i + self.n]), ()):
                if f" {test} " in padded or padded in f" {test} ":
                    return True
        return False


def _rank(seed: int, sentence: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{sentence}".encode(), digest_size=8).digest()


def prepare_sentences(
    corpora: Iterable[str],
    test_sentences: Iterable[str] = (),
    options: TextPrepOptions = TextPrepOptions(),
) -> tuple[TextSplits, TextPrepStats]:
    """Raw corpus sentences -> (train, dev, heldout) normalised sentences, plus statistics."""
    tests = _TestSetIndex(test_sentences, options.overlap_words)
    seen: set[str] = set()
    pool: list[str] = []
    lines = split = pieces = long_ = short = dups = in_tests = 0
    for raw in corpora:
        lines += 1
        whole = normalize(raw)
        if whole and whole in tests:  # the whole line, so no fragment of a test sentence stays
            in_tests += 1
            continue
        parts, dropped = _split(raw, whole, options.max_words, options.min_words)
        long_ += dropped
        if dropped or len(parts) > 1:
            split += 1
        if not parts:
            short += not dropped
        for piece in parts:
            pieces += 1
            if piece in seen:
                dups += 1
                continue
            seen.add(piece)
            if piece in tests:
                in_tests += 1
                continue
            pool.append(piece)
    n_held = min(options.heldout_size, len(pool))
    n_dev = min(options.dev_size, len(pool) - n_held)
    ranked = heapq.nsmallest(n_held + n_dev, pool, key=lambda s: _rank(options.seed, s))
    heldout, dev = ranked[:n_held], ranked[n_held:]
    chosen = set(ranked)
    train = [s for s in pool if s not in chosen]
    stats = TextPrepStats(
        lines, split, pieces, long_, short, dups, in_tests, len(train), len(dev), len(heldout)
    )
    return TextSplits(tuple(train), tuple(dev), tuple(heldout)), stats


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{s}\n" for s in lines), encoding="utf-8")
    tmp.replace(path)


def prepare_text(
    corpus_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    exclude_paths: Sequence[str | os.PathLike[str]] = (),
    options: TextPrepOptions = TextPrepOptions(),
) -> TextPrepStats:
    """Run ``prepare_sentences`` on corpus files and write ``train.txt``, ``dev.txt``,
    ``heldout.txt`` (one normalised sentence per line) and ``stats.json`` into ``out_dir``."""
    tests = [s for p in exclude_paths for s in read_test_sentences(p)]
    corpora = (s for p in corpus_paths for s in read_corpus(p))
    splits, stats = prepare_sentences(corpora, tests, options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "dev", "heldout"):
        _write_lines(out / f"{name}.txt", getattr(splits, name))
    info = {
        "corpora": [str(p) for p in corpus_paths],
        "excluded_test_sets": [str(p) for p in exclude_paths],
        "test_sentences": len(tests),
        "options": asdict(options),
        "stats": stats.to_dict(),
    }
    (out / "stats.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return stats
