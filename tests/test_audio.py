"""Audio loading: resampling keeps pitch, channels mix down, bad files get a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllama import audio
from speechllama.audio import AudioError, audio_duration, check_duration, load_audio


def _sine(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spec) * rate / len(wave))


def _expect_error(path: Path, fragment: str, fn=load_audio) -> AudioError:
    with pytest.raises(AudioError) as info:
        fn(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert fragment in msg, msg
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_resampling_keeps_frequency_and_length(tmp_path: Path, rate: int, ext: str) -> None:
    path = tmp_path / f"sine_{rate}.{ext}"
    sf.write(path, _sine(440.0, rate, seconds=2.0), rate)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 32000) <= 1
    assert abs(_peak_hz(wave, 16000) - 440.0) < 1.0
    # HQ resampling preserves level: RMS of a 0.5 sine is 0.354 (edges excluded).
    assert np.sqrt(np.mean(wave[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    assert audio_duration(path) == pytest.approx(2.0, abs=1e-3)


def test_ogg_decodes(tmp_path: Path) -> None:
    path = tmp_path / "sine.ogg"
    sf.write(path, _sine(1000.0, 48000, seconds=1.0), 48000)
    wave = load_audio(path)
    assert abs(len(wave) - 16000) <= 1
    assert abs(_peak_hz(wave, 16000) - 1000.0) < 2.0


@pytest.mark.parametrize("channels", [2, 6])
def test_channels_are_averaged(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(0)
    data = (0.3 * rng.standard_normal((8000, channels))).clip(-1, 1).astype(np.float32)
    path = tmp_path / f"multi_{channels}.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    wave = load_audio(path)
    np.testing.assert_allclose(wave, data.mean(axis=1), atol=1e-6)


def test_multichannel_resampled(tmp_path: Path) -> None:
    left, right = _sine(300.0, 44100), _sine(300.0, 44100, amp=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    wave = load_audio(path)
    assert abs(_peak_hz(wave, 16000) - 300.0) < 1.0
    assert np.abs(wave).max() == pytest.approx(0.3, abs=0.01)


def test_other_target_rate(tmp_path: Path) -> None:
    path = tmp_path / "sine.wav"
    sf.write(path, _sine(500.0, 16000), 16000)
    wave = load_audio(path, sample_rate=8000)
    assert len(wave) == 8000 and abs(_peak_hz(wave, 8000) - 500.0) < 1.0


def test_missing(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.wav", "not found")
    _expect_error(tmp_path / "nope.wav", "not found", audio_duration)


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.wav"
    d.mkdir()
    _expect_error(d, "directory")
    _expect_error(d, "directory", audio_duration)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod-000 file")
def test_no_permission(tmp_path: Path) -> None:
    path = tmp_path / "locked.wav"
    sf.write(path, _sine(440.0, 16000), 16000)
    path.chmod(0)
    _expect_error(path, "permission denied")


def test_no_permission_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs even as root: the access check is what produces the message.
    path = tmp_path / "locked.wav"
    sf.write(path, _sine(440.0, 16000), 16000)
    monkeypatch.setattr(audio.os, "access", lambda p, mode: False)
    _expect_error(path, "permission denied")


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    path.touch()
    _expect_error(path, "0 bytes")
    _expect_error(path, "0 bytes", audio_duration)


def test_text_renamed_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file, not audio\n")
    _expect_error(path, "not a recognised audio file")
    _expect_error(path, "not a recognised audio file", audio_duration)


def test_truncated_wav(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    sf.write(path, _sine(440.0, 16000), 16000, subtype="PCM_16")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _expect_error(path, "truncated")


def test_truncated_wav_header(tmp_path: Path) -> None:
    path = tmp_path / "cut_header.wav"
    sf.write(path, _sine(440.0, 16000), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:30])
    _expect_error(path, "unreadable or corrupt audio header")


def test_truncated_flac(tmp_path: Path) -> None:
    path = tmp_path / "cut.flac"
    sf.write(path, _sine(440.0, 16000, seconds=3.0), 16000)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _expect_error(path, "truncated or corrupt audio data")


def test_streamed_wav_with_unknown_size_loads(tmp_path: Path) -> None:
    # A WAV written to a pipe carries 0xFFFFFFFF as its data size: not a truncation.
    path = tmp_path / "piped.wav"
    sf.write(path, _sine(440.0, 16000), 16000, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    pos = raw.index(b"data")
    raw[pos + 4 : pos + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(raw))
    assert len(load_audio(path)) == 16000


def test_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    _expect_error(path, "no audio samples")
    _expect_error(path, "no audio samples", audio_duration)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path: Path, bad: float) -> None:
    data = _sine(440.0, 16000)
    data[123] = bad
    path = tmp_path / "nan.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    _expect_error(path, "NaN or infinite")


def test_duration_cap(tmp_path: Path) -> None:
    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(16000 * 5, np.float32), 16000)
    assert check_duration(path, max_seconds=10) == pytest.approx(5.0)
    err = _expect_error(path, "exceeds the 4 s limit", lambda p: load_audio(p, max_seconds=4))
    assert "5.00 s" in str(err)
    _expect_error(path, "too long", lambda p: check_duration(p, max_seconds=2.5))
    assert len(load_audio(path, max_seconds=None)) == 16000 * 5


def test_segment_is_the_slice_of_the_whole_file(tmp_path):
    """offset/duration decode only [offset, offset + duration) of a longer recording; at the
    native rate that is exactly the slice of the whole file, and the cap applies to the segment."""
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000 * 40)).astype(np.float32)
    path = tmp_path / "long.flac"
    sf.write(path, wave, 16000, subtype="PCM_24")
    whole = load_audio(path, max_seconds=None)
    seg = load_audio(path, offset=31.5, duration=2.25)
    np.testing.assert_array_equal(seg, whole[31 * 16000 + 8000 : 33 * 16000 + 12000])
    assert load_audio(path, offset=39.0).shape[0] == 16000  # duration None: to the end
    with pytest.raises(AudioError, match=r"long\.flac: segment at 41 s is past the end"):
        load_audio(path, offset=41.0, duration=1.0)
    with pytest.raises(AudioError, match=r"long\.flac: .*exceeds"):
        load_audio(path)  # the whole 40 s file exceeds the default 30 s cap


def test_train_load_wave_reads_manifest_segments(tmp_path):
    from speechllama.data.manifest import Utterance
    from speechllama.train.data import load_wave

    wave = (0.1 * np.random.default_rng(1).standard_normal(16000 * 5)).astype(np.float32)
    path = tmp_path / "five.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    seg = Utterance(audio_filepath=str(path), text="x", duration=1.0, offset=2.0)
    np.testing.assert_array_equal(load_wave(seg), wave[32000:48000])
    head = Utterance(audio_filepath=str(path), text="x", duration=1.0)  # shorter than the file
    np.testing.assert_array_equal(load_wave(head), wave[:16000])
    whole = Utterance(audio_filepath=str(path), text="x", duration=5.0)
    np.testing.assert_array_equal(load_wave(whole), wave)
