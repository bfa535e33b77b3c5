"""Bad audio through the transcription API: every broken file fails alone with a one-line error
naming it while the rest is transcribed; rates and channel counts are converted; silence gives
an empty transcript without a decoder call; long recordings are cut at pauses in bounded memory
and transcribed piecewise, or refused past the limit; random bytes never crash anything."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transcribe import make_checkpoint, write_wav

from speechllama import load_model
from speechllama.audio import AudioError, load_audio
from speechllama.inputs import join_results
from speechllama.segment import (
    FRAME_SECONDS,
    SegmentOptions,
    find_segments,
    is_silent,
    segment_array,
    segment_file,
)
from speechllama.transcribe import Transcriber

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Transcriber:
    return load_model(make_checkpoint(tmp_path_factory.mktemp("model")))


def tone(seconds: float, rate: int = 16000, freq: float = 300.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t) * (1.2 + np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )


def sparse_wav(path: Path, seconds: float, rate: int, clips: dict[float, np.ndarray]) -> Path:
    """A PCM16 mono WAV of ``seconds`` of digital silence, stored sparse (no disk, no time),
    with ``clips`` (start second -> samples at ``rate``) written in."""
    frames = int(seconds * rate)
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
    with path.open("wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + 2 * frames) + b"WAVEfmt " + fmt)
        f.write(b"data" + struct.pack("<I", 2 * frames))
        f.truncate(44 + 2 * frames)
        for start, clip in clips.items():
            f.seek(44 + 2 * int(start * rate))
            f.write((clip * 32767).astype("<i2").tobytes())
    return path


# --- broken files fail alone, with one line naming the file ---------------------------------


def _broken(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words its error must hold)."""
    (root / "dir.wav").mkdir()
    (root / "zero.wav").write_bytes(b"")
    (root / "text.wav").write_text("definitely not audio\n" * 10)
    sf.write(root / "full.flac", tone(1.0), 16000)
    data = (root / "full.flac").read_bytes()
    (root / "cut.flac").write_bytes(data[: len(data) // 2])
    sf.write(root / "full.wav", tone(1.0), 16000)
    data = (root / "full.wav").read_bytes()
    (root / "cut.wav").write_bytes(data[: len(data) // 2])
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        wave = tone(0.5)
        wave[100] = value
        sf.write(root / f"{name}.wav", wave, 16000, subtype="FLOAT")
    sf.write(root / "blip.wav", tone(0.01), 16000)
    return {
        "missing": (root / "missing.wav", "not found"),
        "directory": (root / "dir.wav", "directory"),
        "zero bytes": (root / "zero.wav", "empty file"),
        "text renamed .wav": (root / "text.wav", "not a recognised audio file"),
        "truncated FLAC": (root / "cut.flac", "truncated or corrupt"),
        "truncated WAV": (root / "cut.wav", "truncated"),
        "NaN": (root / "nan.wav", "NaN or infinite"),
        "inf": (root / "inf.wav", "NaN or infinite"),
        "0.01 s": (root / "blip.wav", "too short"),
    }


def test_each_broken_file_fails_alone_with_one_line(model: Transcriber, tmp_path: Path) -> None:
    broken = _broken(tmp_path)
    good = write_wav(tmp_path / "good.wav", 0.8)
    inputs = [good, *(path for path, _ in broken.values()), good.with_name("good2.wav")]
    write_wav(inputs[-1], 0.6, seed=1)
    out = model.transcribe(inputs, batch_size=4)
    assert out[0].error is None and out[-1].error is None
    assert out[0].tokens == model.transcribe(good).tokens
    for (name, (path, words)), result in zip(broken.items(), out[1:-1], strict=True):
        assert result.error is not None, name
        assert result.error.startswith(f"{path}: ") and words in result.error, result.error
        assert "\n" not in result.error and result.decoder_calls == 0


# --- conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_rates_are_resampled_to_16k(tmp_path: Path, rate: int) -> None:
    ref = tone(1.0, 16000)  # 300 Hz: inside every rate's passband
    sf.write(tmp_path / "x.wav", tone(1.0, rate), rate, subtype="FLOAT")
    wave = load_audio(tmp_path / "x.wav")
    assert wave.shape == ref.shape and wave.dtype == np.float32
    inner = slice(800, -800)  # the resampler's edge transients aside
    assert np.abs(wave[inner] - ref[inner]).max() < 2e-3


def test_stereo_and_six_channels_are_mixed_down(model: Transcriber, tmp_path: Path) -> None:
    mono = write_wav(tmp_path / "mono.wav", 0.9)
    wave, _ = sf.read(mono, dtype="float32")
    sf.write(tmp_path / "stereo.wav", np.stack([wave, wave], 1), 16000, subtype="FLOAT")
    six = np.stack([wave * (c + 1) / 3.5 for c in range(6)], 1)  # mean = wave
    sf.write(tmp_path / "six.wav", six, 16000, subtype="FLOAT")
    ref, stereo, surround = model.transcribe(
        [mono, tmp_path / "stereo.wav", tmp_path / "six.wav"], batch_size=1
    )
    assert stereo.error is None and stereo.tokens == ref.tokens
    assert np.allclose(load_audio(tmp_path / "six.wav"), wave, atol=1e-6)
    assert surround.error is None and surround.audio_seconds == pytest.approx(0.9)


# --- silence ------------------------------------------------------------------------------


def test_silence_gives_an_empty_transcript_without_a_decoder_call(
    model: Transcriber, tmp_path: Path
) -> None:
    sf.write(tmp_path / "zeros.wav", np.zeros(48000, np.float32), 16000)
    hiss = 1e-4 * np.random.default_rng(0).standard_normal(48000)  # -80 dBFS
    sf.write(tmp_path / "hiss.wav", hiss.astype(np.float32), 16000, subtype="FLOAT")
    for r in model.transcribe([tmp_path / "zeros.wav", tmp_path / "hiss.wav", hiss]):
        assert r.error is None and r.text == "" and r.tokens == () and r.decoder_calls == 0
        assert r.audio_seconds == pytest.approx(3.0)
    assert not is_silent(tone(0.5, level=0.01))  # -43 dBFS speech-like level is not silence
    for seconds in (0.03, 0.099):  # a frame or more, but too short to hold a word
        r = model.transcribe(tone(seconds))
        assert r.error is None and r.text == "" and r.decoder_calls == 0


# --- long recordings ----------------------------------------------------------------------


def test_segments_bridge_short_pauses_and_cut_long_stretches_at_the_quietest_frame() -> None:
    per_second = round(1 / FRAME_SECONDS)
    db = np.full(60 * per_second, -100.0, dtype=np.float32)
    db[1 * per_second : 3 * per_second] = -20  # speech 1-3 s,
    db[int(3.1 * per_second) : 4 * per_second] = -20  # a 0.1 s pause (bridged), more to 4 s
    db[10 * per_second : 55 * per_second] = -20  # 45 s without a real pause ...
    db[26 * per_second] = -35  # ... but quieter frames at 26 s and 40 s
    db[40 * per_second] = -30
    segs = find_segments(db, SegmentOptions(max_segment=20.0, pad=0.2))
    bounds = [(round(s.start, 2), round(s.end, 2)) for s in segs]
    assert bounds == [(0.8, 4.2), (9.8, 26.0), (26.0, 40.0), (40.0, 55.2)]
    assert all(s.duration <= 20.0 for s in segs)
    assert find_segments(np.full(500, -100.0, dtype=np.float32)) == []
    clicks = np.full(500, -100.0, dtype=np.float32)
    clicks[100:102] = -10  # 40 ms: shorter than min_speech
    assert find_segments(clicks) == []


def test_two_hour_file_is_segmented_in_bounded_memory_and_transcribed_piecewise(
    model: Transcriber, tmp_path: Path
) -> None:
    rate = 8000  # also resampled, piece by piece
    clips = {600.0: tone(1.5, rate), 3600.0: tone(2.0, rate, 500.0), 7190.0: tone(1.0, rate)}
    path = sparse_wav(tmp_path / "two_hours.wav", 7200.0, rate, clips)
    tracemalloc.start()
    try:
        segs = segment_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    decoded_bytes = 7200 * rate * 4  # what loading it whole as float32 would take: 230 MB
    assert peak < 16e6 < decoded_bytes
    assert [(round(s.start, 1), round(s.end, 1)) for s in segs] == [
        (599.8, 601.7), (3599.8, 3602.2), (7189.8, 7191.2),
    ]  # fmt: skip
    result = model.transcribe(path)
    assert result.error is None and result.extra["segments"] == 3
    assert result.audio_seconds == pytest.approx(7200.0)
    pieces = [
        model.transcribe(load_audio(path, offset=s.start, duration=s.duration, max_seconds=None))
        for s in segs
    ]
    assert result.tokens == tuple(t for p in pieces for t in p.tokens)
    assert result.decoder_calls == sum(p.decoder_calls for p in pieces)


def test_a_long_array_is_segmented_and_a_recording_past_the_limit_refused(
    model: Transcriber, tmp_path: Path
) -> None:
    wave = np.zeros(40 * 16000, dtype=np.float32)
    wave[5 * 16000 : 6 * 16000] = tone(1.0)
    wave[30 * 16000 : 31 * 16000] = tone(1.0, freq=450.0)
    assert len(segment_array(wave)) == 2
    assert model.transcribe(wave).extra["segments"] == 2
    silent = model.transcribe(np.zeros(40 * 16000, dtype=np.float32))
    assert silent.text == "" and silent.decoder_calls == 0 and silent.audio_seconds == 40.0
    huge = sparse_wav(tmp_path / "day.wav", 13 * 3600.0, 8000, {})  # header says 13 hours
    with pytest.raises(AudioError, match=r"day\.wav: too long: 46800 s exceeds the 43200 s"):
        model.transcribe(huge)
    with pytest.raises(AudioError, match="too long"):
        segment_file(huge, max_seconds=3600.0)


def test_join_results_orders_sums_and_fails_on_any_error() -> None:
    from speechllama.decoding import DecodingResult

    a = DecodingResult("hello", (5, 6), 3, (1, 2), 0.1, 0.2, 1.0, "f.wav")
    b = DecodingResult(" world ", (7,), 2, (1, 1), 0.1, 0.1, 2.0, "f.wav")
    j = join_results([a, b])
    assert (j.text, j.tokens, j.decoder_calls, j.accepted_per_call) == (
        "hello world", (5, 6, 7), 5, (2, 3),
    )  # fmt: skip
    bad = join_results([a, DecodingResult("", (), 0, audio_filepath="f.wav", error="f.wav: x")])
    assert bad.error == "f.wav: x" and bad.text == "" and bad.tokens == ()


# --- fuzzing --------------------------------------------------------------------------------


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused: each example rewrites it
_RIFF = b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.binary(max_size=3000),
    prefix=st.sampled_from([b"", _RIFF, _RIFF + b"data\xff\xff\x00\x00", b"fLaC", b"OggS"]),
    suffix=st.sampled_from([".wav", ".flac", ".ogg", ".mp3"]),
)
def test_random_bytes_never_crash(model: Transcriber, tmp_path: Path, body, prefix, suffix) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(prefix + body)
    (result,) = model.transcribe([path])
    if result.error is not None:
        assert result.error.startswith(f"{path}: ") and "\n" not in result.error
    else:
        assert result.audio_seconds > 0 and isinstance(result.text, str)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    samples=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=4000
    ),
    rate=st.sampled_from([8000, 16000, 22050, 48000]),
    channels=st.integers(1, 3),
)
def test_random_samples_decode_or_fail_with_one_line(
    model: Transcriber, tmp_path: Path, samples, rate: int, channels: int
) -> None:
    data = np.asarray(samples, dtype=np.float32)
    data = data[: data.size // channels * channels].reshape(-1, channels)
    path = tmp_path / "fuzz.wav"
    sf.write(path, data, rate, subtype="FLOAT")
    (result,) = model.transcribe([path])
    finite = bool(np.isfinite(data).all())
    if result.error is not None:
        assert result.error.startswith(f"{path}: ") and "\n" not in result.error
        assert not finite or data.shape[0] * 16000 / rate < 400 or "too" in result.error
    else:
        assert finite
        if np.abs(data).max(initial=0.0) < 1e-3:
            assert result.text == "" and result.decoder_calls == 0
