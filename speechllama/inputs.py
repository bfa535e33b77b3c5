"""What ``Transcriber.transcribe`` accepts, and how one input becomes the items it decodes.

An input is a file path, a 16 kHz mono array or a ``Clip`` (a span of a file, as manifests give
segments of long recordings). One longer than ``MAX_SECONDS`` is cut at its pauses into pieces
(``speechllama.segment``, reading only the header and frame energies), each loaded on its own when
its batch comes, so memory stays bounded whatever the length; ``Pieces`` joins their results,
which finish in duration order, back into one result per input in time order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speechllama.audio import MAX_SECONDS
from speechllama.decoding import DecodingResult
from speechllama.segment import Segment, segment_array, segment_file


@dataclass(frozen=True)
class Clip:
    """A span of an audio file, ``offset`` seconds in and ``duration`` long (None: to the end),
    as manifests describe segments of longer recordings; only that span is ever decoded."""

    path: str
    offset: float = 0.0
    duration: float | None = None


AudioInput = str | os.PathLike | np.ndarray | Clip
SAMPLE_RATE = 16_000


class Item:
    """One input, or one piece of a long input (``piece``: its span, in seconds): where it
    came from and (once known) its duration in seconds."""

    __slots__ = ("duration", "index", "name", "piece", "source")

    def __init__(self, index: int, source: AudioInput, piece: Segment | None = None) -> None:
        self.index = index
        if isinstance(source, Clip):  # split_input gives its span as the piece
            source = source.path
        self.source = source
        self.name = None if isinstance(source, np.ndarray) else os.fspath(source)
        self.piece = piece
        self.duration = 0.0 if piece is None else piece.duration

    def load(self) -> np.ndarray:
        """The item's 16 kHz mono samples (a piece: only its span is decoded)."""
        from speechllama.audio import load_audio

        if isinstance(self.source, np.ndarray):
            wave = check_array(self.source)
            if self.piece is None:
                return wave
            return wave[round(self.piece.start * SAMPLE_RATE) : round(self.piece.end * SAMPLE_RATE)]
        if self.piece is None:
            return load_audio(self.source, sample_rate=SAMPLE_RATE)
        return load_audio(
            self.source, SAMPLE_RATE, None, offset=self.piece.start, duration=self.piece.duration
        )


def check_array(wave: np.ndarray) -> np.ndarray:
    """Arrays are taken as 16 kHz mono samples; reject what cannot be that."""
    from speechllama.audio import AudioError

    if wave.ndim != 1:
        raise AudioError("audio array", f"expected 1-D 16 kHz mono samples, got {wave.shape}")
    if wave.size == 0:
        raise AudioError("audio array", "no samples")
    if not np.isfinite(wave).all():
        raise AudioError("audio array", "holds NaN or infinite samples")
    return wave.astype(np.float32, copy=False)


def clip_span(clip: Clip) -> Segment:
    """The span of ``clip`` in its file (its length read from the header when open-ended)."""
    from speechllama.audio import audio_duration

    end = audio_duration(clip.path) if clip.duration is None else clip.offset + clip.duration
    return Segment(clip.offset, end)


def split_input(index: int, source: AudioInput) -> tuple[list[Item], float]:
    """The items to transcribe for one input (itself, or when longer than ``MAX_SECONDS`` its
    speech segments: none for a long input without speech) and its duration in seconds. Only
    a file's header and frame energies are read here. Raises ``AudioError``."""
    from speechllama.audio import AudioError, audio_duration

    if isinstance(source, Clip):  # a manifest's segment: transcribed as it is
        span = clip_span(source)
        if span.duration <= 0:
            raise AudioError(source.path, f"segment at {source.offset:g} s is past the end")
        return [Item(index, source, span)], span.duration
    item = Item(index, source)
    if isinstance(source, np.ndarray):
        wave = check_array(source)
        item.duration = wave.shape[0] / SAMPLE_RATE
        spans = segment_array(wave, SAMPLE_RATE) if item.duration > MAX_SECONDS else None
    else:
        item.duration = audio_duration(source)
        spans = segment_file(source) if item.duration > MAX_SECONDS else None
    if spans is None:
        return [item], item.duration
    return [Item(index, source, span) for span in spans], item.duration


class Pieces:
    """Collects the results of one long input's pieces; ``add`` returns the joined result
    once the last piece is in (pieces finish in duration order, not in time order)."""

    def __init__(self, count: int, seconds: float) -> None:
        self.count = count
        self.seconds = seconds
        self.done: list[tuple[float, DecodingResult]] = []

    def add(self, piece: Segment, result: DecodingResult) -> DecodingResult | None:
        self.done.append((piece.start, result))
        if len(self.done) < self.count:
            return None
        self.done.sort(key=lambda pair: pair[0])
        joined = join_results([r for _, r in self.done])
        return dataclasses.replace(joined, audio_seconds=self.seconds)


def join_results(parts: Sequence[DecodingResult]) -> DecodingResult:
    """One result from the results of consecutive pieces of one input (in time order): texts
    joined by a space, tokens concatenated, calls, histograms and seconds summed
    (``extra["segments"]``: how many); the first error, if any, fails the whole input."""
    error = next((p.error for p in parts if p.error is not None), None)
    histogram: list[int] = []
    for p in parts:
        for i, n in enumerate(p.accepted_per_call):
            histogram.extend([0] * (i + 1 - len(histogram)))
            histogram[i] += n
    return DecodingResult(
        text="" if error else " ".join(p.text.strip() for p in parts if p.text.strip()),
        tokens=() if error else tuple(t for p in parts for t in p.tokens),
        decoder_calls=sum(p.decoder_calls for p in parts),
        accepted_per_call=tuple(histogram),
        encoder_seconds=sum(p.encoder_seconds for p in parts),
        decoder_seconds=sum(p.decoder_seconds for p in parts),
        audio_seconds=sum(p.audio_seconds for p in parts),
        audio_filepath=parts[0].audio_filepath,
        error=error,
        extra={"segments": float(len(parts))},
    )
