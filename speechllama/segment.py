"""Split long recordings at pauses into pieces the model can take, in bounded memory.

The model is trained on utterances of a few seconds and its decoder context holds about half a
minute of audio, so a meeting or an audiobook chapter has to be cut into pieces first. This is
an energy-based voice activity detector: the RMS level of every 20 ms frame (in dB re full
scale), a threshold a little above the recording's own noise floor, pauses shorter than
``min_pause`` bridged, stretches longer than ``max_segment`` cut at their quietest frame.

Why energy and not ``silero-vad``: measured on this 2-core machine (one thread, shared), the
frame energies of 58 s of speech took 0.011 s (5,300x real time), while silero-vad's ONNX model
(an 11 MB wheel that also requires torch) took 0.22 s (260x real time: 28 s per audio hour
before any transcription). Energy is enough to find the pauses that bound utterances in read
or recorded speech, it needs no model file, and cutting at the quietest frame keeps words
whole; silero would add robustness to loud non-speech noise, at that cost.

Memory: a file is read in blocks of ``block_seconds`` (``audio.read_blocks``), so what is held
is one block plus one float32 per frame (4 bytes per 20 ms: 1.4 MB for two hours); each piece is
then decoded on its own (``load_audio(offset=..., duration=...)``). A file longer than
``MAX_FILE_SECONDS`` is refused from its header, before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechllama.audio import AudioError, audio_duration, read_blocks

__all__ = [
    "FRAME_SECONDS",
    "MAX_FILE_SECONDS",
    "Segment",
    "SegmentOptions",
    "find_segments",
    "frame_energies",
    "is_silent",
    "segment_array",
    "segment_file",
]

FRAME_SECONDS = 0.02
MAX_FILE_SECONDS = 12 * 3600.0
"""Longest recording ``segment_file`` accepts: its frame energies stay under 9 MB."""
_QUIET_DB = -120.0  # the level given to digital silence (log of 0 clipped)


@dataclass(frozen=True)
class SegmentOptions:
    """``floor_db``: frames quieter than this (RMS, dB re full scale) are never speech, so
    digital silence and faint hiss give no segments; ``above_noise_db``: the threshold sits this
    far above the recording's noise floor (its 10th-percentile frame level), never below
    ``floor_db``. ``min_pause``: shorter pauses do not end a segment; ``min_speech``: shorter
    voiced stretches (clicks) are dropped; ``pad``: seconds kept on each side of a stretch;
    ``max_segment``: longer stretches are cut at their quietest frame in the second half."""

    floor_db: float = -60.0
    above_noise_db: float = 12.0
    min_pause: float = 0.3
    min_speech: float = 0.1
    pad: float = 0.2
    max_segment: float = 20.0
    block_seconds: float = 10.0


@dataclass(frozen=True)
class Segment:
    """A piece of a recording, in seconds from its start."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def frame_energies(wave: np.ndarray, rate: int) -> np.ndarray:
    """(num_frames,) float32 RMS level in dB re full scale of each ``FRAME_SECONDS`` frame of
    the mono ``wave`` (a trailing partial frame is dropped)."""
    return _levels(wave, max(1, round(rate * FRAME_SECONDS)))


def _levels(wave: np.ndarray, size: int) -> np.ndarray:
    frames = wave[: wave.shape[0] // size * size].reshape(-1, size)
    power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / size
    return np.maximum(10 * np.log10(np.maximum(power, 1e-30)), _QUIET_DB).astype(np.float32)


def is_silent(wave: np.ndarray, rate: int = 16000, floor_db: float | None = None) -> bool:
    """True when no frame of ``wave`` reaches ``floor_db`` (default: ``SegmentOptions``'s):
    nothing a speech model should be asked to transcribe. A clip shorter than one frame is
    judged by its whole length."""
    floor = SegmentOptions.floor_db if floor_db is None else floor_db
    if wave.size == 0:
        return True
    energies = _levels(wave, min(wave.shape[0], max(1, round(rate * FRAME_SECONDS))))
    return bool(energies.max() < floor)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame index pairs of the True stretches of ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


def find_segments(energies: np.ndarray, options: SegmentOptions | None = None) -> list[Segment]:
    """Speech segments of a recording from its ``frame_energies`` (see the module doc)."""
    o = options or SegmentOptions()
    if energies.size == 0:
        return []
    noise = float(np.percentile(energies, 10))
    voiced = energies >= max(o.floor_db, noise + o.above_noise_db)
    runs = _runs(voiced)
    merged: list[list[int]] = []
    gap = round(o.min_pause / FRAME_SECONDS)
    for start, end in runs:
        if merged and start - merged[-1][1] < gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    pad = round(o.pad / FRAME_SECONDS)
    longest = max(2, round(o.max_segment / FRAME_SECONDS))
    n = energies.size
    out: list[Segment] = []
    for start, end in merged:
        if (end - start) * FRAME_SECONDS < o.min_speech:
            continue
        start, end = max(0, start - pad), min(n, end + pad)
        while end - start > longest:
            lo = start + longest // 2
            cut = lo + int(np.argmin(energies[lo : start + longest]))
            out.append(Segment(start * FRAME_SECONDS, cut * FRAME_SECONDS))
            start = cut
        if out and start * FRAME_SECONDS < out[-1].end:  # the pads overlap: meet halfway
            middle = (start * FRAME_SECONDS + out[-1].end) / 2
            out[-1] = Segment(out[-1].start, middle)
            out.append(Segment(middle, end * FRAME_SECONDS))
            continue
        out.append(Segment(start * FRAME_SECONDS, end * FRAME_SECONDS))
    return out


def segment_array(
    wave: np.ndarray, rate: int = 16000, options: SegmentOptions | None = None
) -> list[Segment]:
    """Speech segments of the mono samples ``wave``."""
    return find_segments(frame_energies(wave, rate), options)


def segment_file(
    path: str | Path,
    options: SegmentOptions | None = None,
    max_seconds: float | None = MAX_FILE_SECONDS,
) -> list[Segment]:
    """Speech segments of the audio file ``path``, read block by block (bounded memory).

    Raises ``AudioError`` for an unreadable file, one with NaN/infinite samples or a truncated
    one (as ``load_audio`` does), and for one longer than ``max_seconds`` (None: no limit)."""
    o = options or SegmentOptions()
    seconds = audio_duration(path)
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            path, f"too long: {seconds:.0f} s exceeds the {max_seconds:.0f} s limit for one file"
        )
    parts: list[np.ndarray] = []
    carry = np.zeros(0, dtype=np.float32)
    for block, rate in read_blocks(path, o.block_seconds):
        block = np.concatenate([carry, block]) if carry.size else block
        size = max(1, round(rate * FRAME_SECONDS))
        whole = block.shape[0] // size * size
        parts.append(frame_energies(block[:whole], rate))
        carry = block[whole:]
    energies = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    segments = find_segments(energies, o)
    return [Segment(s.start, min(s.end, seconds)) for s in segments if s.start < seconds]
