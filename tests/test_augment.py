"""Waveform augmentation: each stage does what it claims, and draws are reproducible."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from speechllama.data.augment import (
    AugmentConfig,
    Augmenter,
    colored_noise,
    room_impulse_response,
)

RATE = 16000
OFF = AugmentConfig(speed_prob=0.0, reverb_prob=0.0, noise_prob=0.0, band_limit_prob=0.0)


def _only(**changes: object) -> AugmentConfig:
    return dataclasses.replace(OFF, **changes)


def _sine(hz: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _power(x: np.ndarray) -> float:
    return float(np.mean(x.astype(np.float64) ** 2))


def _band_energy(x: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def _peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / RATE)[np.argmax(spectrum)])


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_speed_perturbation_changes_length_and_pitch(speed: float) -> None:
    x = _sine(1000.0)
    y = Augmenter(_only(speed_prob=1.0, speeds=(speed,)))(x)
    assert abs(len(y) - len(x) / speed) <= 1
    assert _peak_hz(y) == pytest.approx(1000.0 * speed, abs=2.0)


def test_speed_one_and_all_off_leave_audio_alone_but_copy() -> None:
    x = _sine(300.0)
    for config in (OFF, _only(speed_prob=1.0, speeds=(1.0,))):
        y = Augmenter(config)(x)
        np.testing.assert_array_equal(y, x)
        assert y is not x and y.dtype == np.float32


def test_noise_snr_within_range() -> None:
    x = _sine(440.0, seconds=2.0, amplitude=0.1)
    augment = Augmenter(_only(noise_prob=1.0, snr_db=(10.0, 30.0)), seed=3)
    snrs = []
    for _ in range(30):
        y = augment(x)
        snrs.append(10 * np.log10(_power(x) / _power(y - x)))
    assert all(10.0 - 1e-3 <= s <= 30.0 + 1e-3 for s in snrs)
    assert max(snrs) - min(snrs) > 5  # drawn across the range, not one fixed value
    # a fixed SNR is hit exactly, for every colour
    for color in ("white", "pink", "brown"):
        config = _only(noise_prob=1.0, snr_db=(20.0, 20.0), noise_colors=(color,))
        y = Augmenter(config, seed=1)(x)
        assert 10 * np.log10(_power(x) / _power(y - x)) == pytest.approx(20.0, abs=0.01)


@pytest.mark.parametrize(("color", "slope"), [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_noise_colours_have_their_spectral_slope(color: str, slope: float) -> None:
    noise = colored_noise(1 << 16, color, np.random.default_rng(0))
    assert _power(noise) == pytest.approx(1.0, rel=1e-3)
    # power per Hz in octave bands from 100 Hz to 6.4 kHz, fitted in log-log
    edges = 100 * 2.0 ** np.arange(7)
    density = [_band_energy(noise, lo, hi) / (hi - lo) for lo, hi in itertools.pairwise(edges)]
    centres = np.sqrt(edges[:-1] * edges[1:])
    fitted = np.polyfit(np.log10(centres), np.log10(density), 1)[0]
    assert fitted == pytest.approx(slope, abs=0.15)


def test_room_impulse_response_decays_with_rt60_and_drr() -> None:
    rir = room_impulse_response(0.5, 6.0, RATE, np.random.default_rng(0))
    assert len(rir) == 8000 and rir[0] == 1.0
    tail = rir[1:]
    assert 10 * np.log10(1.0 / np.sum(tail**2)) == pytest.approx(6.0, abs=1e-6)
    # energy 60 dB down at RT60: compare the first and last 50 ms of the tail
    first, last = np.sum(tail[:800] ** 2), np.sum(tail[-800:] ** 2)
    assert 10 * np.log10(first / last) > 45


def test_reverb_keeps_length_level_and_finite_values() -> None:
    x = _sine(500.0, seconds=1.5)
    x[RATE // 2 :] = 0.0  # a burst then silence: the reverb tail must fill the silence
    config = _only(reverb_prob=1.0, rt60=(0.3, 0.9))
    augment = Augmenter(config, seed=2)
    for _ in range(5):
        y = augment(x)
        assert y.shape == x.shape and np.isfinite(y).all()
        assert _power(y) == pytest.approx(_power(x), rel=1e-3)
        assert _power(y[RATE // 2 + 800 : RATE]) > 1e-6  # the room rings after the burst
        assert not np.allclose(y, x, atol=1e-3)


def test_band_limit_removes_energy_above_4khz() -> None:
    x = (0.1 * np.random.default_rng(0).standard_normal(RATE)).astype(np.float32)
    y = Augmenter(_only(band_limit_prob=1.0))(x)
    assert y.shape == x.shape
    above_in, above_out = _band_energy(x, 4100, 8000), _band_energy(y, 4100, 8000)
    assert above_out < 1e-4 * above_in
    below_in, below_out = _band_energy(x, 100, 3400), _band_energy(y, 100, 3400)
    assert below_out == pytest.approx(below_in, rel=0.05)


def test_output_is_float32_and_never_clips() -> None:
    x = _sine(200.0, amplitude=0.99)
    config = AugmentConfig(speed_prob=1.0, reverb_prob=1.0, noise_prob=1.0, snr_db=(0.0, 0.0))
    y = Augmenter(config, seed=0)(x)
    assert y.dtype == np.float32 and np.max(np.abs(y)) <= 1.0 + 1e-6


def test_deterministic_by_seed_and_by_passed_generator() -> None:
    x = _sine(300.0) + _sine(2300.0, amplitude=0.05)
    config = AugmentConfig(reverb_prob=0.5, noise_prob=0.5, band_limit_prob=0.5)
    first, second = Augmenter(config, seed=11), Augmenter(config, seed=11)
    runs_a = [first(x) for _ in range(8)]
    runs_b = [second(x) for _ in range(8)]
    for ya, yb in zip(runs_a, runs_b, strict=True):
        np.testing.assert_array_equal(ya, yb)
    # successive calls draw differently, and so does another seed
    assert len({ya.tobytes() for ya in runs_a}) > 1
    other = Augmenter(config, seed=12)
    assert any(not np.array_equal(other(x), ya) for ya in runs_a)
    # the (audio, rng) form used by the data loader: same generator seed, same output
    shared = Augmenter(config, seed=0)
    y1 = shared(x, np.random.default_rng([5, 0, 42]))
    y2 = shared(x, np.random.default_rng([5, 0, 42]))
    np.testing.assert_array_equal(y1, y2)


def test_clean_share_leaves_that_share_untouched() -> None:
    x = _sine(300.0)
    busy = AugmentConfig(speed_prob=0.0, noise_prob=1.0)  # every other utterance is changed
    outs = [Augmenter(dataclasses.replace(busy, clean_prob=0.5), seed=s)(x) for s in range(200)]
    clean = sum(np.array_equal(y, x) for y in outs)
    assert 70 <= clean <= 130  # binomial(200, 0.5): far outside this is a bug
    half = dataclasses.replace(busy, clean_prob=0.5)
    first, second = Augmenter(half, seed=3), Augmenter(half, seed=3)
    for _ in range(6):  # still reproducible by seed
        np.testing.assert_array_equal(first(x), second(x))
    with pytest.raises(ValueError, match="clean_prob must be in"):
        AugmentConfig(clean_prob=2.0)


def test_bad_input_and_config() -> None:
    augment = Augmenter(AugmentConfig(noise_prob=1.0, reverb_prob=1.0, band_limit_prob=1.0))
    assert augment(np.zeros(0, dtype=np.float32)).shape == (0,)
    silent = augment(np.zeros(RATE, dtype=np.float32))
    assert np.isfinite(silent).all()
    with pytest.raises(ValueError, match="1-D waveform"):
        augment(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="noise_prob must be in"):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(ValueError, match="snr_db: low 30"):
        AugmentConfig(snr_db=(30.0, 10.0))
    with pytest.raises(ValueError, match="noise_colors"):
        AugmentConfig(noise_colors=("purple",))
    with pytest.raises(ValueError, match="unknown augmentation option"):
        AugmentConfig.from_dict({"speed": 1.1})
    config = AugmentConfig.from_dict({"speeds": [0.95, 1.05], "noise_prob": 0.2})
    assert config.speeds == (0.95, 1.05)
    assert AugmentConfig.from_dict(config.to_dict()) == config
