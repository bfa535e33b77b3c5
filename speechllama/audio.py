"""Audio loading: any soundfile-readable file -> 16 kHz mono float32, or one clear error.

Everything downstream (features, encoders, caches) assumes a 1-D float32 waveform in [-1, 1] at
one sample rate, so this module is the single place where files are decoded, channels are mixed
down and sample rates are converted. A bad file must never reach the model as silence or garbage:
it raises :class:`AudioError`, whose message is one line naming the file and the problem, so that
batch jobs can log it, skip the file and carry on.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "MAX_SECONDS",
    "SAMPLE_RATE",
    "AudioError",
    "audio_duration",
    "check_duration",
    "load_audio",
    "read_blocks",
]

SAMPLE_RATE = 16000
"""The rate every feature front end expects."""

MAX_SECONDS = 30.0
"""Default cap on one utterance: Whisper's encoder window, and far above any training utterance.
Longer recordings are cut at pauses first (``speechllama.segment``, which reads them with
``read_blocks``); the cap stops a 2-hour file from being decoded into memory and pushed through
the model as one sequence."""

# WAV headers written by a pipe (sox/ffmpeg to stdout) leave the data size unknown.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)


class AudioError(ValueError):
    """A file that cannot be used as speech input. ``str()`` is one line: ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(reason.split())  # libsndfile messages may hold newlines
        super().__init__(f"{self.path}: {self.reason}")


def _check_file(path: Path) -> None:
    """Raise the precise filesystem-level problem before libsndfile turns it into a vague one."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except OSError as e:
        raise AudioError(path, f"cannot access file ({e.strerror})") from None
    except ValueError:  # os.stat refuses a path with a NUL character
        raise AudioError(repr(str(path)), "not a valid path (holds a NUL character)") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(path, "is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(path, "is not a regular file")
    if not os.access(path, os.R_OK):
        raise AudioError(path, "permission denied (file is not readable)")
    if st.st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")


def _libsndfile_reason(e: RuntimeError) -> str:
    """libsndfile's own message without soundfile's "Error opening '<path>': " prefix."""
    msg = getattr(e, "error_string", None) or str(e)
    return msg.strip().rstrip(".")


def _wav_truncation(path: Path, info: sf._SoundFileInfo) -> str | None:
    """For RIFF WAV: the reason the data chunk is shorter than its header says, else None.

    libsndfile silently shortens a truncated WAV to the bytes present, which would hand a cut-off
    utterance to training with the full transcript. FLAC/OGG truncation makes libsndfile fail on
    decode instead, so only WAV needs this check.
    """
    if info.format != "WAV":
        return None
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        for _ in range(64):  # a handful of chunks precede 'data' in practice
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                present = file_size - offset - 8
                if size in _UNKNOWN_WAV_SIZES or present >= size:
                    return None
                return f"truncated: header declares {size} data bytes, only {present} present"
            offset += 8 + size + (size & 1)
            f.seek(offset)
    return None


def _info(path: Path) -> sf._SoundFileInfo:
    _check_file(path)
    try:
        info = sf.info(str(path))
    except RuntimeError as e:  # soundfile.LibsndfileError
        reason = _libsndfile_reason(e)
        if "Format not recognised" in reason:
            reason = "not a recognised audio file (expected wav/flac/ogg)"
        else:
            reason = f"unreadable or corrupt audio header ({reason})"
        raise AudioError(path, reason) from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(path, f"invalid header ({info.channels} channels at {info.samplerate} Hz)")
    if info.frames <= 0:
        raise AudioError(path, "no audio samples (empty recording)")
    return info


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the header alone (no decode), with the same checks as loading."""
    info = _info(Path(path))
    return info.frames / info.samplerate


def check_duration(path: str | Path, max_seconds: float = MAX_SECONDS) -> float:
    """Duration in seconds; :class:`AudioError` if it exceeds ``max_seconds``."""
    seconds = audio_duration(path)
    _enforce_cap(Path(path), seconds, max_seconds)
    return seconds


def _enforce_cap(path: Path, seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            path,
            f"too long: {seconds:.2f} s exceeds the {max_seconds:g} s limit "
            "(segment long recordings first)",
        )


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = MAX_SECONDS,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """Decode ``path`` to a (num_samples,) float32 waveform in [-1, 1] at ``sample_rate``.

    Channels are averaged (any count: stereo, 5.1, ...), which keeps the level of a centred
    voice; mixing happens before resampling so soxr converts one channel instead of many.
    Resampling uses soxr's HQ preset (passband flat to ~0.9 Nyquist, >100 dB stopband).
    ``offset``/``duration`` (seconds; None: to the end) select a segment of a longer recording,
    as NeMo and Lhotse manifests do; only that segment is decoded, and ``max_seconds`` (None: no
    cap) applies to it, checked from the header before decoding.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    path = Path(path)
    info = _info(path)
    start = round(offset * info.samplerate)
    if offset < 0 or (offset > 0 and start >= info.frames):
        raise AudioError(path, f"segment at {offset:g} s is past the end")
    frames = -1 if duration is None else round(duration * info.samplerate)
    span = info.frames - start if frames < 0 else min(frames, info.frames - start)
    _enforce_cap(path, span / info.samplerate, max_seconds)
    truncated = _wav_truncation(path, info)
    if truncated:
        raise AudioError(path, truncated)
    try:
        data, rate = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except RuntimeError as e:  # soundfile.LibsndfileError: truncated FLAC/OGG, bad frames
        reason = f"truncated or corrupt audio data ({_libsndfile_reason(e)})"
        raise AudioError(path, reason) from None
    if data.shape[0] == 0:
        raise AudioError(path, "no audio samples (empty recording)")
    wave = _mono(path, data, start / info.samplerate)
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _mono(path: Path, data: np.ndarray, at: float) -> np.ndarray:
    """(frames, channels) -> (frames,) channel mean; non-finite samples raise (``at``: the
    block's start in seconds, for the message)."""
    if not np.isfinite(data).all():
        where = f" (first near {at:.1f} s)" if at else ""
        raise AudioError(path, f"contains NaN or infinite samples{where}")
    return data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)


def read_blocks(path: str | Path, block_seconds: float = 10.0) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(samples, rate)`` blocks of about ``block_seconds`` of ``path`` in order: mono
    float32 at the file's own rate, with ``load_audio``'s checks (bad header, truncation,
    non-finite samples, corrupt data raise :class:`AudioError`). Holds one block at a time, so
    a recording of any length is scanned in bounded memory."""
    path = Path(path)
    info = _info(path)
    truncated = _wav_truncation(path, info)
    if truncated:
        raise AudioError(path, truncated)
    size = max(1, round(block_seconds * info.samplerate))
    done = 0
    try:
        for data in sf.blocks(str(path), blocksize=size, dtype="float32", always_2d=True):
            yield _mono(path, data, done / info.samplerate), info.samplerate
            done += data.shape[0]
    except RuntimeError as e:  # soundfile.LibsndfileError: truncated FLAC/OGG, bad frames
        at = done / info.samplerate
        reason = f"truncated or corrupt audio data near {at:.1f} s ({_libsndfile_reason(e)})"
        raise AudioError(path, reason) from None
