"""Uploaded bytes -> 16 kHz mono float32 samples, or an :class:`ApiError` naming the problem.

Uploads go through ``speechllama.audio.load_audio`` (from a temporary file), so an upload is
decoded, mixed down and resampled exactly as ``transcribe`` does it for the same file: the
API's transcript equals the library's, and every check ``load_audio`` makes (unknown format,
corrupt header, truncated data, NaN samples, duration cap) applies to uploads too. Its
messages name the temporary file; they are rewritten to name the upload instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from speechllama.serve.errors import ApiError

__all__ = ["decode_upload"]

# The suffix tells libsndfile nothing it needs (it reads the header), but a recognisable name
# helps anyone looking at a leftover temporary file; only these characters are kept.
_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789")


def decode_upload(data: bytes, filename: str, max_seconds: float) -> np.ndarray:
    """Decode ``data`` (the uploaded file's bytes) to (samples,) float32 at 16 kHz.

    Raises ``ApiError`` 400 ``empty_file`` / ``invalid_audio``, 415 ``unsupported_format``,
    413 ``audio_too_long`` (longer than ``max_seconds``)."""
    from speechllama.audio import SAMPLE_RATE, AudioError, load_audio

    name = filename or "upload"
    if not data:
        raise ApiError(400, f"{name}: empty upload (0 bytes)", code="empty_file", param="file")
    suffix = Path(name).suffix.lower()
    suffix = "." + "".join(ch for ch in suffix if ch in _SAFE) if suffix else ""
    fd, tmp = tempfile.mkstemp(prefix="speechllama-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio(tmp, SAMPLE_RATE, max_seconds)
    except AudioError as exc:
        raise _audio_error(name, exc.reason) from None
    finally:
        os.unlink(tmp)


def _audio_error(name: str, reason: str) -> ApiError:
    """The HTTP status and code for a ``load_audio`` failure ``reason``."""
    message = f"{name}: {reason}"
    if reason.startswith("too long"):
        return ApiError(413, message, code="audio_too_long", param="file")
    if reason.startswith("not a recognised audio file"):
        return ApiError(415, message, code="unsupported_format", param="file")
    return ApiError(400, message, code="invalid_audio", param="file")
