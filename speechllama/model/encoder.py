"""Speech encoder factory: ``EncoderConfig`` -> module.

Every encoder maps ``features (B, T, n_mels)`` and ``lens (B,)`` to ``hidden (B, T', output_dim)``
and ``lens' (B,)``; padded frames never influence valid ones and come out as zeros.

- ``conformer``: :class:`~speechllama.model.conformer.ConformerEncoder`, trained from scratch.
- ``whisper``: :class:`~speechllama.model.whisper_encoder.WhisperEncoder`; its pretrained
  weights come from ``cfg.source`` via :func:`speechllama.model.weights.load_encoder_weights`
  (the caller decides when, so a checkpoint load does not read them twice).
"""

from __future__ import annotations

from speechllama.model.config import EncoderConfig
from speechllama.model.conformer import ConformerEncoder
from speechllama.model.encoder_common import SpeechEncoder
from speechllama.model.whisper_encoder import WhisperEncoder

__all__ = ["ConformerEncoder", "SpeechEncoder", "WhisperEncoder", "build_encoder"]


def build_encoder(cfg: EncoderConfig) -> SpeechEncoder:
    """Build a randomly initialised encoder; frozen (no grad, eval pinned) when ``cfg.frozen``."""
    encoder: SpeechEncoder
    if cfg.kind == "conformer":
        encoder = ConformerEncoder(
            n_mels=cfg.n_mels,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            d_ff=cfg.d_ff,
            conv_kernel=cfg.conv_kernel,
            subsampling=cfg.subsampling,
            dropout=cfg.dropout,
        )
    elif cfg.kind == "whisper":
        if cfg.subsampling != 2:
            raise ValueError(f"whisper encoder subsamples by 2, config says {cfg.subsampling}")
        encoder = WhisperEncoder(
            n_mels=cfg.n_mels,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            d_ff=cfg.d_ff,
            dropout=cfg.dropout,
        )
    else:
        raise ValueError(f"unknown encoder kind {cfg.kind!r}; choose conformer or whisper")
    if cfg.frozen:
        encoder.freeze()
    if cfg.train_top:
        if not isinstance(encoder, WhisperEncoder):
            raise ValueError("encoder.train_top needs a whisper encoder")
        encoder.set_train_top(cfg.train_top)
    return encoder
