"""Feature front ends: Kaldi log-mel fbank, Whisper log-mel, and SpecAugment.

Both extractors take a 16 kHz float waveform in [-1, 1] (what :func:`speechllama.audio.load_audio`
returns) and give (T, n_mels) frames at 100 Hz. They are vectorised torch code (framing by
``unfold``, one batched real FFT, one matmul with the mel matrix) so a 10-s utterance costs a few
milliseconds on one thread, and they accept any leading batch dims for equal-length inputs.

Input scale: the fbank does **not** multiply by 32768. It follows lhotse and icefall (and
sherpa-onnx with kaldi-native-fbank), which feed samples in [-1, 1]; Kaldi's own
``compute-fbank-feats`` reads int16 values instead, so its log-mel energies are these plus
``2 * ln(32768) ≈ 20.79`` wherever the FLT_EPSILON floor is not active. Models trained with
icefall/lhotse features therefore see the same numbers as ours.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "SAMPLE_RATE",
    "FeatureKind",
    "SpecAugment",
    "compute_features",
    "feature_frames",
    "kaldi_fbank",
    "kaldi_mel_banks",
    "slaney_mel_filters",
    "whisper_log_mel",
]

FeatureKind = Literal["fbank", "whisper"]
SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100  # both kinds: one frame every 160 samples (10 ms)

# Kaldi fbank at 16 kHz: 25 ms windows every 10 ms, FFT zero-padded to the next power of two.
_K_WIN, _K_HOP, _K_FFT = 400, 160, 512
_K_PREEMPH = 0.97
_K_LOW_HZ = 20.0
_K_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi floors mel energies at FLT_EPSILON before log

# Whisper: 25 ms periodic Hann windows every 10 ms, 400-point FFT (201 bins), centred frames.
_W_FFT, _W_HOP = 400, 160


# ---------------------------------------------------------------------------- Kaldi fbank


@lru_cache(maxsize=8)
def kaldi_mel_banks(n_mels: int = 80, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """(n_fft/2 + 1, n_mels) triangular weights on Kaldi's mel scale, ``1127 ln(1 + f/700)``.

    Triangles are equally spaced in mel between 20 Hz and Nyquist and are evaluated at each FFT
    bin's mel value (not interpolated in Hz), exactly as Kaldi's ``MelBanks``. The Nyquist bin
    gets no weight because Kaldi only scans bins 0..n_fft/2 - 1.
    """
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    lo, hi = mel(_K_LOW_HZ), mel(sample_rate / 2)
    delta = (hi - lo) / (n_mels + 1)
    left = lo + delta * np.arange(n_mels)[None, :]
    centre, right = left + delta, left + 2 * delta
    bin_mel = mel(np.arange(_K_FFT // 2) * sample_rate / _K_FFT)[:, None]
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    w = np.where(bin_mel <= centre, up, down)
    w = np.where((bin_mel > left) & (bin_mel < right), w, 0.0)
    w = np.concatenate([w, np.zeros((1, n_mels))], axis=0)
    return torch.from_numpy(w.astype(np.float32))


@lru_cache(maxsize=1)
def _povey_window() -> Tensor:
    """Kaldi's default window: a Hann window raised to 0.85 (non-zero ends, symmetric)."""
    n = torch.arange(_K_WIN, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (_K_WIN - 1))).pow(0.85).float()


def kaldi_fbank(
    wave: Tensor, n_mels: int = 80, dither: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """(..., N) float waveform in [-1, 1] at 16 kHz -> (..., T, n_mels) Kaldi log-mel fbank.

    T = 1 + (N - 400) // 160 (``snip_edges``: only whole windows; 0 if N < 400). Per frame,
    in Kaldi's order: optional dither, DC offset removal, pre-emphasis 0.97, Povey window,
    512-point power spectrum, mel triangles 20 Hz..Nyquist, natural log floored at FLT_EPSILON
    (Kaldi's ``energy_floor`` only touches the energy coefficient, which is not produced here).

    ``dither`` (default 0, so features are deterministic) adds ``dither`` x N(0, 1) noise to the
    waveform once, drawn from ``generator``; Kaldi draws it per frame, which differs only in
    which noise overlapping frames share. Its scale is in [-1, 1] units, not Kaldi's int16 ones.
    """
    wave = wave.float()
    if dither:
        noise = torch.randn(wave.shape, generator=generator, device="cpu").to(wave.device)
        wave = wave + dither * noise
    n = wave.shape[-1]
    if n < _K_WIN:
        return wave.new_zeros((*wave.shape[:-1], 0, n_mels))
    t = 1 + (n - _K_WIN) // _K_HOP
    wave = wave[..., : (t - 1) * _K_HOP + _K_WIN]
    raw = wave.unfold(-1, _K_WIN, _K_HOP)  # (..., T, 400) view, no copy
    dc = raw.mean(dim=-1, keepdim=True)
    # DC removal and pre-emphasis commute up to a constant: with the per-frame mean m,
    # y[i] = (x[i] - m) - 0.97 (x[i-1] - m) = e[i] - 0.03 m, where e is the pre-emphasised
    # waveform; Kaldi's frame edge rule (x[-1] := x[0]) makes e[0] = 0.03 x[0]. Pre-emphasising
    # the waveform once and writing straight into the zero-padded FFT buffer is ~2.5x faster than
    # doing each step on a materialised (T, 400) copy.
    emph = torch.cat([wave[..., :1], wave[..., 1:] - _K_PREEMPH * wave[..., :-1]], dim=-1)
    buf = wave.new_zeros((*wave.shape[:-1], t, _K_FFT))
    frames = buf[..., :_K_WIN]
    frames.copy_(emph.unfold(-1, _K_WIN, _K_HOP))
    frames[..., 0] = (1.0 - _K_PREEMPH) * raw[..., 0]
    frames.sub_(dc, alpha=1.0 - _K_PREEMPH).mul_(_povey_window().to(wave.device))
    spec = torch.fft.rfft(buf)  # (..., T, 257)
    power = spec.real.square() + spec.imag.square()
    mel = power @ kaldi_mel_banks(n_mels).to(wave.device)
    return mel.clamp_min(_K_FLOOR).log()


# ---------------------------------------------------------------------------- Whisper log-mel


def _hz_to_slaney_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox scale: linear (3 bins per 200 Hz) below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _slaney_mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0)
    return np.where(m >= 15.0, log, lin)


@lru_cache(maxsize=8)
def slaney_mel_filters(
    n_mels: int = 80, n_fft: int = _W_FFT, sample_rate: int = SAMPLE_RATE
) -> Tensor:
    """(n_fft/2 + 1, n_mels) mel filters as librosa's ``filters.mel`` builds them for Whisper.

    Slaney mel scale, triangles interpolated linearly in Hz between mel-spaced edges 0..Nyquist,
    each scaled by 2 / (bandwidth in Hz) ("slaney" area normalisation) so wide high bands do
    not dominate the log spectrum.
    """
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _slaney_mel_to_hz(
        np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(sample_rate / 2), n_mels + 2)
    )
    width = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]  # (n_mels + 2, bins)
    rising = -ramps[:-2] / width[:-1, None]
    falling = ramps[2:] / width[1:, None]
    w = np.maximum(0.0, np.minimum(rising, falling))
    w *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(w.T.astype(np.float32))


@lru_cache(maxsize=1)
def _hann_window() -> Tensor:
    return torch.hann_window(_W_FFT, periodic=True)


def whisper_log_mel(wave: Tensor, n_mels: int = 80) -> Tensor:
    """(..., N) float waveform in [-1, 1] at 16 kHz -> (..., T, n_mels) Whisper log-mel.

    T = N // 160. Frame t is centred on sample 160 t (reflect padding on the left, as
    ``torch.stft(center=True)``).
    Whisper pads every input with zeros to 30 s before its STFT; we pad only 200 zeros (half a
    window), which is all the zeros any of the first N // 160 frames can see, so those frames are
    bit-for-bit the frames Whisper computes, without the cost of the other 30 s. The last STFT
    frame is dropped in Whisper (3000 frames per 30 s), hence N // 160.

    Normalisation: log10 floored at 1e-10, clamped to (max - 8) and mapped by (x + 4) / 4, with
    the max taken per utterance over the returned frames. Whisper takes it over its padded 30 s,
    whose extra frames are mostly silence (log10 = -10, never the max); the two maxima differ only
    if the loudest frame is one of the few straddling the end of the audio, or for near-silence.
    """
    wave = wave.float()
    n = wave.shape[-1]
    t = n // _W_HOP
    if t == 0:
        return wave.new_zeros((*wave.shape[:-1], 0, n_mels))
    half = _W_FFT // 2
    zeros = wave.new_zeros((*wave.shape[:-1], half))
    padded = torch.cat([wave, zeros], dim=-1)
    # Left edge: reflect the zero-padded signal (matches Whisper's reflect pad even when N < 200).
    left = padded[..., 1 : half + 1].flip(-1)
    padded = torch.cat([left, padded], dim=-1)[..., : (t - 1) * _W_HOP + _W_FFT]
    frames = padded.unfold(-1, _W_FFT, _W_HOP) * _hann_window().to(wave.device)  # (..., T, 400)
    spec = torch.fft.rfft(frames)  # (..., T, 201)
    power = spec.real.square() + spec.imag.square()
    log_spec = (power @ slaney_mel_filters(n_mels).to(wave.device)).clamp_min(1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


# ---------------------------------------------------------------------------- entry points


def _as_wave(wave: np.ndarray | Tensor) -> Tensor:
    t = torch.from_numpy(np.asarray(wave)) if isinstance(wave, np.ndarray) else wave
    if not torch.is_floating_point(t):
        raise TypeError(
            f"expected a float waveform in [-1, 1], got dtype {t.dtype} "
            "(convert integer PCM with x / 32768 first)"
        )
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {tuple(t.shape)}")
    return t.float()


def compute_features(wave: np.ndarray | Tensor, kind: FeatureKind, n_mels: int = 80) -> Tensor:
    """The one feature entry point: (N,) 16 kHz waveform -> (T, n_mels) float32 on wave's device.

    ``fbank`` is the Kaldi front end for encoders trained here; ``whisper`` is what Whisper's
    encoder was trained on (n_mels 80, or 128 for large-v3). T = :func:`feature_frames`.
    """
    x = _as_wave(wave)
    if kind == "fbank":
        return kaldi_fbank(x, n_mels)
    if kind == "whisper":
        return whisper_log_mel(x, n_mels)
    raise ValueError(f"unknown feature kind {kind!r} (expected 'fbank' or 'whisper')")


def feature_frames(num_samples: int, kind: FeatureKind) -> int:
    """Frames :func:`compute_features` returns for ``num_samples`` samples, without computing."""
    if kind == "fbank":
        return 0 if num_samples < _K_WIN else 1 + (num_samples - _K_WIN) // _K_HOP
    if kind == "whisper":
        return max(num_samples, 0) // _W_HOP
    raise ValueError(f"unknown feature kind {kind!r} (expected 'fbank' or 'whisper')")


# ---------------------------------------------------------------------------- SpecAugment


def _spans(
    count: int, max_width: Tensor, extent: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Random [start, start + width) spans: (B, count) starts and widths, width ~ U{0..max_width},
    start ~ U{0..extent - width}, so every span lies inside [0, extent). Drawn on the CPU so a
    generator gives the same masks on any device."""
    b = extent.shape[0]
    u_w, u_s = torch.rand((2, b, count), generator=generator)
    width = (u_w * (max_width[:, None] + 1).float()).long().minimum(max_width[:, None])
    room = (extent[:, None] - width).clamp_min(0)
    start = (u_s * (room + 1).float()).long().minimum(room)
    return start, width


def _span_mask(start: Tensor, width: Tensor, size: int) -> Tensor:
    """(B, M) spans -> (B, size) bool, True inside any span."""
    pos = torch.arange(size)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return inside.any(dim=1)


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al., 2019) on a padded batch, training mode only.

    ``freq_masks`` bands of up to ``freq_width`` bins and ``time_masks`` spans of up to
    ``time_width`` x length frames each (a fraction, so short and long utterances lose the same
    share) are set to ``fill``; ``fill=None`` uses each utterance's mean over its valid frames,
    which is the neutral value for unnormalised log-mels (0 would be loud for Kaldi fbank and
    quiet for nothing in particular). Padding frames (t >= length) are never touched. In eval
    mode the input is returned as is. Randomness comes from ``generator`` when given, else from
    torch's global RNG, so ``torch.manual_seed`` makes it reproducible either way.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 10,
        time_width: float = 0.05,
        fill: float | None = None,
    ) -> None:
        super().__init__()
        if min(freq_masks, freq_width, time_masks) < 0 or not 0.0 <= time_width <= 1.0:
            raise ValueError("mask counts/widths must be >= 0 and time_width in [0, 1]")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.fill = fill

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """x (B, T, F) features, lengths (B,) valid frames (None: all T) -> masked (B, T, F)."""
        if not self.training:
            return x
        b, t, f = x.shape
        lengths = torch.full((b,), t) if lengths is None else lengths.detach().cpu().long()
        valid = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
        full_f = torch.full((b,), f)
        fs, fw = _spans(self.freq_masks, full_f.clamp_max(self.freq_width), full_f, generator)
        max_tw = (self.time_width * lengths.float()).floor().long()
        ts, tw = _spans(self.time_masks, max_tw, lengths, generator)
        mask = _span_mask(ts, tw, t)[:, :, None] | _span_mask(fs, fw, f)[:, None, :]
        mask = (mask & valid[:, :, None]).to(x.device)  # (B, T, F)
        if self.fill is not None:
            return x.masked_fill(mask, self.fill)
        v = valid.to(device=x.device, dtype=x.dtype)[:, :, None]
        count = (lengths.to(x.device) * f).clamp_min(1)[:, None, None]
        mean = (x * v).sum(dim=(1, 2), keepdim=True) / count
        return torch.where(mask, mean.to(x.dtype), x)

    def extra_repr(self) -> str:
        return (
            f"freq_masks={self.freq_masks}, freq_width={self.freq_width}, "
            f"time_masks={self.time_masks}, time_width={self.time_width}, fill={self.fill}"
        )
