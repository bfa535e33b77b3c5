"""Feature front ends against their references (kaldi-native-fbank, transformers' Whisper
extractor) and SpecAugment's masking contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechllama.features import (
    SpecAugment,
    compute_features,
    feature_frames,
    kaldi_fbank,
    slaney_mel_filters,
    whisper_log_mel,
)

knf = pytest.importorskip("kaldi_native_fbank")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)


def _speechlike(n: int, seed: int = 0) -> np.ndarray:
    """A chirp over noise with a stretch of digital silence (exercises the log floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.4 * np.sin(2 * np.pi * (150 + 900 * t) * t) + 0.03 * rng.standard_normal(n)
    x[n // 3 : n // 3 + 1200] = 0.0
    return x.astype(np.float32)


def _knf_fbank(x: np.ndarray, n_mels: int) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = n_mels
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, x.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


@pytest.mark.parametrize("n_mels", [80, 40])
@pytest.mark.parametrize("n", [16000 * 2, 16000 + 333, 400])
def test_fbank_matches_kaldi_native_fbank(n_mels: int, n: int) -> None:
    x = _speechlike(n)
    ref = _knf_fbank(x, n_mels)
    ours = compute_features(x, "fbank", n_mels=n_mels).numpy()
    assert ours.shape == ref.shape == (feature_frames(n, "fbank"), n_mels)
    # Both are float32 pipelines with different FFTs. Measured: <= 1.4e-4 (log units) on bins
    # with real energy, up to ~9e-4 on near-silent bins (log < -10) where float32 rounding after
    # DC removal dominates; a wrong window, pre-emphasis or mel edge costs > 1.
    loud = ref > -10
    np.testing.assert_allclose(ours[loud], ref[loud], atol=5e-4, rtol=0)
    np.testing.assert_allclose(ours, ref, atol=5e-3, rtol=0)
    if n > 16000:  # whole frames of digital silence hit Kaldi's FLT_EPSILON floor
        assert np.isclose(ours.min(), np.log(np.finfo(np.float32).eps))


def test_fbank_is_batched_and_deterministic() -> None:
    x = torch.from_numpy(np.stack([_speechlike(8000, 1), _speechlike(8000, 2)]))
    batch = kaldi_fbank(x)
    assert batch.shape == (2, feature_frames(8000, "fbank"), 80)
    for i in range(2):
        torch.testing.assert_close(batch[i], kaldi_fbank(x[i]), atol=1e-5, rtol=0)
    torch.testing.assert_close(kaldi_fbank(x), batch, atol=0, rtol=0)


def test_fbank_dither_is_seeded() -> None:
    x = torch.from_numpy(_speechlike(8000))
    a = kaldi_fbank(x, dither=1e-3, generator=torch.Generator().manual_seed(0))
    b = kaldi_fbank(x, dither=1e-3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, kaldi_fbank(x))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filters_match_transformers(n_mels: int) -> None:
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    np.testing.assert_allclose(slaney_mel_filters(n_mels).numpy(), fe.mel_filters, atol=1e-7)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("n", [16000 * 2, 16000 * 3 + 77, 4001])
def test_whisper_log_mel_matches_transformers(n_mels: int, n: int) -> None:
    # transformers pads to 30 s and clamps at (max - 8) over all 3000 frames. The padding frames
    # are silence (log10 = -10 < max - 8), so for audio whose loudest frame lies well inside it
    # (true here: a steady chirp) the clamp is identical and the first N // 160 frames must agree.
    x = _speechlike(n)
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    ref = fe(x, sampling_rate=16000, return_tensors="np")["input_features"][0].T  # (3000, F)
    ours = compute_features(torch.from_numpy(x), "whisper", n_mels=n_mels).numpy()
    assert ours.shape == (n // 160, n_mels) == (feature_frames(n, "whisper"), n_mels)
    np.testing.assert_allclose(ours, ref[: len(ours)], atol=1e-5, rtol=0)


def test_whisper_batched_clamps_per_utterance() -> None:
    loud, quiet = _speechlike(4800, 1), 0.001 * _speechlike(4800, 2)
    batch = whisper_log_mel(torch.from_numpy(np.stack([loud, quiet])))
    torch.testing.assert_close(batch[1], whisper_log_mel(torch.from_numpy(quiet)))
    torch.testing.assert_close(batch[0], whisper_log_mel(torch.from_numpy(loud)))


@pytest.mark.parametrize("kind", ["fbank", "whisper"])
def test_feature_frames_predicts_shape(kind: str) -> None:
    for n in [0, 1, 159, 160, 161, 399, 400, 401, 559, 560, 561, 16000]:
        x = np.full(n, 0.1, dtype=np.float64)  # float64 input is accepted and cast
        feats = compute_features(x, kind)
        assert feats.shape == (feature_frames(n, kind), 80), (kind, n)
        assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_compute_features_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="32768"):
        compute_features(np.zeros(1600, dtype=np.int16), "fbank")
    with pytest.raises(ValueError, match="1-D"):
        compute_features(np.zeros((2, 1600), dtype=np.float32), "whisper")
    with pytest.raises(ValueError, match="unknown feature kind"):
        compute_features(np.zeros(1600, dtype=np.float32), "mfcc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown feature kind"):
        feature_frames(1600, "mfcc")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- SpecAugment

FILL = -1234.0


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 120, 80, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([120, 77, 40, 1])


def test_specaugment_eval_is_identity() -> None:
    x, lengths = _batch()
    aug = SpecAugment().eval()
    assert aug(x, lengths) is x


def test_specaugment_masks_stay_inside_valid_frames() -> None:
    x, lengths = _batch()
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=3, time_width=0.2, fill=FILL)
    for seed in range(20):
        out = aug.train()(x, lengths, generator=torch.Generator().manual_seed(seed))
        masked = out == FILL
        assert torch.equal(out[~masked], x[~masked])
        for b, length in enumerate(lengths.tolist()):
            assert not masked[b, length:].any()  # padding never touched
            m = masked[b, :length]
            freq_cols = m.all(dim=0)  # bands masked over every valid frame
            time_rows = m.all(dim=1)
            assert int(freq_cols.sum()) <= 2 * 10
            assert int(time_rows.sum()) <= 3 * int(0.2 * length)
            # Every masked cell is explained by a full band or a full time span.
            assert torch.equal(m, freq_cols[None, :] | time_rows[:, None])


def test_specaugment_time_span_width_is_a_fraction_of_length() -> None:
    x = torch.zeros(64, 200, 8)
    lengths = torch.full((64,), 100)
    aug = SpecAugment(freq_masks=0, time_masks=1, time_width=0.1, fill=1.0).train()
    out = aug(x, lengths, generator=torch.Generator().manual_seed(0))
    widths = (out[:, :, 0] == 1.0).sum(dim=1)
    assert widths.max() <= 10 and widths.max() >= 8  # up to floor(0.1 * 100), and it gets there
    assert (out[:, 100:] == 0).all()
    for row in out[:, :, 0]:
        idx = row.nonzero().flatten()
        if len(idx):
            assert idx[-1] - idx[0] + 1 == len(idx)  # one contiguous span


def test_specaugment_is_reproducible() -> None:
    x, lengths = _batch()
    aug = SpecAugment(fill=0.0).train()
    a = aug(x, lengths, generator=torch.Generator().manual_seed(7))
    b = aug(x, lengths, generator=torch.Generator().manual_seed(7))
    c = aug(x, lengths, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = aug(x, lengths)
    torch.manual_seed(11)
    assert torch.equal(d, aug(x, lengths))


def test_specaugment_default_fill_is_utterance_mean() -> None:
    x, lengths = _batch()
    x = x + torch.arange(4.0)[:, None, None] * 10  # distinct means per utterance
    out = SpecAugment(freq_masks=1, freq_width=80, time_masks=0).train()(
        x, lengths, generator=torch.Generator().manual_seed(1)
    )
    for b, length in enumerate(lengths.tolist()):
        changed = out[b, :length] != x[b, :length]
        if changed.any():
            mean = x[b, :length].mean()
            torch.testing.assert_close(out[b, :length][changed], mean.expand(int(changed.sum())))
