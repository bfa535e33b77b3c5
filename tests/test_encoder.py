"""Speech encoders: shapes, lengths, padding invariance, freezing, rotary positions."""

from __future__ import annotations

import pytest
import torch

from speechllama.model.config import EncoderConfig, preset
from speechllama.model.conformer import ConformerEncoder, apply_rotary, rotary_tables
from speechllama.model.encoder import build_encoder
from speechllama.model.whisper_encoder import WhisperEncoder, sinusoids

torch.set_num_threads(1)


def small_conformer(**overrides: object) -> ConformerEncoder:
    kwargs: dict = dict(
        n_mels=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, conv_kernel=5, dropout=0.1
    )
    kwargs.update(overrides)
    return ConformerEncoder(**kwargs)


def small_whisper() -> WhisperEncoder:
    return WhisperEncoder(n_mels=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_frames=40)


def assert_padding_invariant(encoder: torch.nn.Module, n_mels: int, lengths: list[int]) -> None:
    """Each sequence of a padded batch (padding filled with garbage) must give the outputs it
    gives alone, and padded output frames must be zero."""
    encoder.eval()
    torch.manual_seed(1)
    seqs = [torch.randn(n, n_mels) for n in lengths]
    batch = torch.randn(len(seqs), max(lengths), n_mels) * 10  # garbage in the padding
    for i, seq in enumerate(seqs):
        batch[i, : len(seq)] = seq
    with torch.no_grad():
        hidden, out_lens = encoder(batch, torch.tensor(lengths))
        for i, seq in enumerate(seqs):
            alone, alone_len = encoder(seq[None], torch.tensor([len(seq)]))
            n = int(alone_len)
            assert int(out_lens[i]) == n == alone.shape[1]
            torch.testing.assert_close(hidden[i, :n], alone[0], atol=2e-5, rtol=1e-4)
            assert torch.all(hidden[i, n:] == 0)


@pytest.mark.parametrize(
    ("subsampling", "t_in", "t_out"), [(4, 203, 51), (4, 8, 2), (2, 203, 102), (1, 17, 17)]
)
def test_conformer_shapes_and_lengths(subsampling: int, t_in: int, t_out: int) -> None:
    enc = small_conformer(subsampling=subsampling)
    hidden, lens = enc(torch.randn(2, t_in, 16), torch.tensor([t_in, 5]))
    assert hidden.shape == (2, t_out, 32)
    assert enc.output_dim == 32
    # Each stride-2 conv gives ceil(n / 2) frames.
    expected_short = 5
    for _ in range({4: 2, 2: 1, 1: 0}[subsampling]):
        expected_short = -(-expected_short // 2)
    assert lens.tolist() == [t_out, expected_short]


def test_conformer_padded_frames_do_not_change_valid_outputs() -> None:
    assert_padding_invariant(small_conformer(), 16, [37, 20, 9])


def test_whisper_padded_frames_do_not_change_valid_outputs() -> None:
    assert_padding_invariant(small_whisper(), 16, [41, 30, 7])


def test_whisper_refuses_more_than_its_positions() -> None:
    enc = small_whisper()
    hidden, lens = enc(torch.randn(1, 80, 16), torch.tensor([80]))  # exactly 40 frames out
    assert hidden.shape == (1, 40, 32) and lens.tolist() == [40]
    with pytest.raises(ValueError, match="segment the audio"):
        enc(torch.randn(1, 81, 16), torch.tensor([81]))


def test_bad_inputs_give_clear_errors() -> None:
    enc = small_conformer()
    with pytest.raises(ValueError, match=r"\(batch, frames, 16\)"):
        enc(torch.randn(1, 20, 80), torch.tensor([20]))
    with pytest.raises(ValueError, match="lens must lie"):
        enc(torch.randn(1, 20, 16), torch.tensor([21]))


def test_conformer_trains_and_dropout_is_active() -> None:
    enc = small_conformer(dropout=0.5)
    x, lens = torch.randn(2, 40, 16), torch.tensor([40, 30])
    enc.train()
    first, _ = enc(x, lens)
    second, _ = enc(x, lens)
    assert not torch.allclose(first, second)  # dropout fires in training
    first.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x, lens)[0], enc(x, lens)[0])


def test_build_encoder_presets_and_frozen_whisper() -> None:
    whisper_cfg = preset("small", 64).encoder
    enc = build_encoder(whisper_cfg)
    assert isinstance(enc, WhisperEncoder) and enc.output_dim == 384
    assert not any(p.requires_grad for p in enc.parameters())
    wrapper = torch.nn.Sequential(enc)
    wrapper.train()
    assert not enc.training  # frozen encoders stay in eval mode
    conformer = build_encoder(preset("conformer-small", 64).encoder)
    assert isinstance(conformer, ConformerEncoder) and conformer.output_dim == 256
    assert all(p.requires_grad for p in conformer.parameters())
    with pytest.raises(ValueError, match="subsamples by 2"):
        build_encoder(EncoderConfig(kind="whisper", subsampling=4))


def test_rotary_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rotary_tables(20, 8, torch.device("cpu"))

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    torch.testing.assert_close(score(3, 7), score(12, 16))
    torch.testing.assert_close(score(0, 0), q @ k)
    assert not torch.allclose(score(3, 7), score(3, 8))


def test_sinusoids_layout() -> None:
    table = sinusoids(10, 8)
    assert table.shape == (10, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # Channel 0 has timescale 1 (sin t), channel 3 the largest (10000).
    torch.testing.assert_close(table[:, 0], torch.arange(10.0).sin())
    torch.testing.assert_close(table[:, 7], (torch.arange(10.0) / 10_000).cos())
