"""The project's one text normaliser, and the SentencePiece tokenizer wrapper.

``normalize`` is the only function that turns written text into the form the model is trained
to write *and* the form WER is scored on. Training targets (``target_ids``) and scoring both call
it, so a number written "1865" in a reference and "eighteen sixty five" in a hypothesis cannot
count as an error, and the model never has to learn punctuation it cannot hear.

Output alphabet: lowercase letters (unicode letters are kept, not transliterated), apostrophes
inside words (``don't``, ``o'clock``), single spaces. Everything else is spoken out or dropped.
The function is idempotent: ``normalize(normalize(s)) == normalize(s)``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from num2words import num2words

__all__ = [
    "Tokenizer",
    "TokenizerError",
    "TokenizerLike",
    "normalize",
    "read_lines",
    "target_ids",
    "tokenizer_id",
    "train_tokenizer",
]

# --- normaliser -------------------------------------------------------------------------------

# Characters NFKC leaves alone but that are apostrophes or fraction slashes in running text.
_CHAR_MAP = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "`": "'", "´": "'", "′": "'", "⁄": "/"})

# Titles a TTS voice reads out in full; the written form must become the spoken form so that
# "Mr. Neild" in one corpus and "Mister Neild" in another are the same target.
_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor", "prof": "professor"}
_TITLE_RE = re.compile(r"\b(mr|mrs|dr|prof)\b\.?", re.IGNORECASE)
_SAINT_RE = re.compile(r"\bSt\.(?=\s+[A-Z])")  # "St. Paul" is a saint; "Main St." a street

_SCALES = "thousand|million|billion|trillion"
_CURRENCY_SCALE_RE = re.compile(rf"([$£€])\s?(\d+(?:\.\d+)?)\s*({_SCALES})\b", re.IGNORECASE)
_CURRENCY_RE = re.compile(r"([$£€])\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{2}))?(?!\d)")
_CURRENCY_NAMES = {"$": ("dollar", "cent"), "£": ("pound", "penny"), "€": ("euro", "cent")}
_PERCENT_RE = re.compile(r"(\d)\s?%")
_TIME_RE = re.compile(r"(?<![\d.,:])(\d{1,2}):(\d{2})(?![\d:])")
_DECADE_RE = re.compile(r"(?<![\d.,])'?(\d{2}|\d{4})'?s\b")
_ORDINAL_RE = re.compile(r"(?<![\d.,])(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_FRACTION_RE = re.compile(r"(?<![\d.,/])(\d+)/(\d+)(?![\d/])")
_DECIMAL_RE = re.compile(r"(?<![\d.,])(\d*)\.(\d+)(?![\d.])")
_GROUPED_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d])")
_INTEGER_RE = re.compile(r"\d+")
_APOSTROPHE_EDGE_RE = re.compile(r"(?<!\w)'|'(?!\w)")
_NOT_WORD_RE = re.compile(r"[^\w\s']|_")
_SPACE_RE = re.compile(r"\s+")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _clean(words: str) -> str:
    """num2words writes British "one hundred and five" with hyphens and commas; keep the
    American reading without "and" (as LJSpeech's transcripts do), spaces only."""
    words = words.replace("-", " ").replace(",", " ")
    return " ".join(w for w in words.split() if w != "and")


def _cardinal(digits: str) -> str:
    if len(digits) > 1 and digits.startswith("0"):  # "007", phone numbers: read digit by digit
        return " ".join(_DIGIT_WORDS[int(d)] for d in digits)
    return _clean(num2words(int(digits)))


def _year_or_cardinal(digits: str) -> str:
    """A bare four-digit number from 1100 to 2099 is read as a year ("eighteen sixty five",
    "fifteen hundred"), which is how people say both years and most such round counts."""
    value = int(digits)
    if len(digits) == 4 and 1100 <= value <= 2099:
        return _clean(num2words(value, to="year"))
    return _cardinal(digits)


def _plural(words: str) -> str:
    head, _, last = words.rpartition(" ")
    last = last[:-1] + "ies" if last.endswith("y") else last + ("es" if last.endswith("x") else "s")
    return f"{head} {last}".strip()


def _fraction(num: str, den: str) -> str:
    n, d = int(num), int(den)
    if d == 0:
        return f"{_cardinal(num)} over {_cardinal(den)}"
    if d == 1:
        return _cardinal(num)
    unit = {2: "half", 4: "quarter"}.get(d) or _clean(num2words(d, to="ordinal"))
    if n != 1:
        unit = "halves" if d == 2 else _plural(unit)
    return f"{_cardinal(num)} {unit}"


def _decimal(whole: str, frac: str) -> str:
    head = _cardinal(whole) if whole else ""
    return f"{head} point {' '.join(_DIGIT_WORDS[int(d)] for d in frac)}".strip()


def _currency(match: re.Match[str]) -> str:
    major, minor = _CURRENCY_NAMES[match.group(1)]
    amount = match.group(2).replace(",", "")
    words = f"{_cardinal(amount)} {major}{'' if amount == '1' else 's'}"
    cents = match.group(3)
    if cents and int(cents):
        minor_name = minor if int(cents) == 1 else ("pence" if minor == "penny" else minor + "s")
        words += f" {_cardinal(str(int(cents)))} {minor_name}"
    return f" {words} "


def _currency_scale(match: re.Match[str]) -> str:
    major = _CURRENCY_NAMES[match.group(1)][0]
    amount = match.group(2)
    number = _decimal(*amount.split(".")) if "." in amount else _cardinal(amount)
    return f" {number} {match.group(3).lower()} {major}s "


def _time(match: re.Match[str]) -> str:
    hour, minute = match.group(1), int(match.group(2))
    if minute == 0:
        return f" {_cardinal(str(int(hour)))} o'clock "
    tail = f"oh {_DIGIT_WORDS[minute]}" if minute < 10 else _cardinal(str(minute))
    return f" {_cardinal(str(int(hour)))} {tail} "


def _spell_numbers(text: str) -> str:
    """Spell every digit sequence. The order matters: specific shapes (money, times, decades,
    ordinals, fractions, decimals, grouped thousands) before plain integers."""
    text = _CURRENCY_SCALE_RE.sub(_currency_scale, text)
    text = _CURRENCY_RE.sub(_currency, text)
    text = _PERCENT_RE.sub(r"\1 percent", text)
    text = _TIME_RE.sub(_time, text)
    text = _DECADE_RE.sub(lambda m: f" {_plural(_year_or_cardinal(m.group(1)))} ", text)
    text = _ORDINAL_RE.sub(lambda m: f" {_clean(num2words(int(m.group(1)), to='ordinal'))} ", text)
    text = _FRACTION_RE.sub(lambda m: f" {_fraction(m.group(1), m.group(2))} ", text)
    text = _DECIMAL_RE.sub(lambda m: f" {_decimal(m.group(1), m.group(2))} ", text)
    text = _GROUPED_RE.sub(lambda m: f" {_cardinal(m.group(0).replace(',', ''))} ", text)
    return _INTEGER_RE.sub(lambda m: f" {_year_or_cardinal(m.group(0))} ", text)


def normalize(text: str) -> str:
    """Written English -> the spoken-form string used for training targets and for WER.

    NFKC; curly apostrophes -> ``'``; titles (Mr., Mrs., Dr., Prof., St. before a name) spoken
    out; money, percentages, times, decades, ordinals, fractions, decimals and integers spelled
    with num2words (years 1100-2099 read as years); ``&`` -> "and"; lowercase; apostrophes kept
    only inside words (a quote mark or a plural possessive ``boys'`` cannot be heard); every other
    punctuation mark becomes a space; whitespace collapsed.
    """
    text = unicodedata.normalize("NFKC", text).translate(_CHAR_MAP)
    text = _SAINT_RE.sub("saint", text)
    text = _TITLE_RE.sub(lambda m: _TITLES[m.group(1).lower()], text)
    text = text.replace("&", " and ")
    text = _spell_numbers(text).lower()
    text = _NOT_WORD_RE.sub(" ", text)
    text = _APOSTROPHE_EDGE_RE.sub(" ", text)
    return _SPACE_RE.sub(" ", text).strip()


# --- tokenizer --------------------------------------------------------------------------------

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer model that cannot be loaded or trained; the message names the file."""


@runtime_checkable
class TokenizerLike(Protocol):
    """What decoding, evaluation and training need from a tokenizer: this module's
    SentencePiece :class:`Tokenizer`, or a pretrained LLM's own
    (:class:`speechllama.tokenizer_bpe.BPETokenizer`). ``encode`` adds no special tokens;
    ``decode`` skips pad/bos/eos."""

    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def tokenizer_id(tokenizer: TokenizerLike) -> str:
    """What identifies a tokenizer: the SentencePiece model's bytes (hashed), or the pretrained
    LLM file a BPE tokenizer is read from (its vocabulary is that file's)."""
    proto = getattr(tokenizer, "model_proto", None)
    if proto is not None:
        return hashlib.sha256(proto).hexdigest()
    return f"source:{tokenizer.source}"  # type: ignore[attr-defined]


class Tokenizer:
    """SentencePiece model with the project's fixed special ids (pad 0, bos 1, eos 2, unk 3).

    ``encode`` expects text that already went through ``normalize`` (use ``target_ids`` for raw
    text); it adds no BOS/EOS, the caller decides where they go.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_proto: bytes, name: str = "<bytes>") -> None:
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{name}: not a SentencePiece model ({exc})") from None
        found = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
        if found != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise TokenizerError(
                f"{name}: special ids pad/bos/eos/unk are {found}, expected (0, 1, 2, 3); "
                "train it with `speechllama tokenizer train`"
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        path = Path(path)
        try:
            proto = path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read tokenizer ({exc.strerror})") from None
        return cls(proto, name=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self._proto)

    @property
    def model_proto(self) -> bytes:
        """Serialized model, for storing inside a checkpoint directory."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. pad/bos/eos are skipped; an id outside the vocabulary is an error."""
        size = self.vocab_size
        keep = []
        for i in ids:
            i = int(i)
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {size})")
            if i not in (PAD_ID, BOS_ID, EOS_ID):
                keep.append(i)
        return self._sp.DecodeIds(keep)

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def target_ids(text: str, tokenizer: Tokenizer, *, add_eos: bool = True) -> list[int]:
    """Raw transcript -> training target ids: ``normalize``, encode, then EOS (no BOS: the model
    inserts BOS after the audio embeddings itself)."""
    ids = tokenizer.encode(normalize(text))
    return [*ids, EOS_ID] if add_eos else ids


def read_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """Lines of a UTF-8 text file (``.gz`` read through gzip), newlines included."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {exc.start} of a line)") from None
    except OSError as exc:
        raise OSError(f"{path}: cannot read ({exc.strerror or exc})") from None


def train_tokenizer(
    sentences: Iterable[str] | str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "unigram",
    *,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train a SentencePiece model on normalised text and write it to ``model_path``.

    ``sentences`` is an iterable of sentences, or one path (a ``str`` is always a path) to a
    text file, one sentence per line (``.gz`` allowed). Every sentence goes through ``normalize``
    first (a no-op on already normalised text), and SentencePiece's own normalisation is off
    (``identity``) so that ``decode(encode(s)) == s`` for every normalised ``s``. Character
    coverage is 1.0: every character seen in training gets a piece.
    """
    import sentencepiece as spm

    if isinstance(sentences, (str, os.PathLike)):
        sentences = read_lines(sentences)
    normalised = (s for s in (normalize(line) for line in sentences) if s)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=normalised,
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            normalization_rule_name="identity",
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerError(f"{model_path}: tokenizer training failed: {exc}") from None
    tokenizer = Tokenizer(buffer.getvalue(), name=str(model_path))
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(model_path)
    return tokenizer
