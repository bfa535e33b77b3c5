"""The assembled Speech-LLaMA: encoder -> adapter -> LLaMA decoder -> heads.

INTERFACE SKELETON (to be implemented). Sequence layout per utterance i:
    [audio embeddings a_0..a_{S_i-1}] [BOS] y_1 .. y_U [EOS]
with absolute positions 0..S_i+U+1; the KV cache slot of a token equals its position.
"""

from __future__ import annotations

import torch
from torch import nn

from speechllama.model.config import ModelConfig


class SpeechLLaMA(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder_calls = 0  # incremented by prefill() and step(): strategies cannot forget

    def encode(
        self, features: torch.Tensor, feature_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, n_mels), feature_lens (B,) -> audio embeddings (B, S, d_dec), lens (B,).

        Runs the encoder and the adapter (frame stacking + projection)."""
        raise NotImplementedError

    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced training pass.

        audio (B, S, d_dec) audio embeddings, audio_lens (B,); tokens (B, U) = [BOS] y_1..y_{U-1}
        right-padded, token_lens (B,). Returns logits (B, U, K, V) for the text positions only:
        logits[:, u, k] predicts token u + k + 1 of [BOS] y EOS (head k, 0-based)."""
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int) -> "KVCache":  # noqa: F821
        raise NotImplementedError

    def prefill(self, audio: torch.Tensor, audio_lens: torch.Tensor, cache) -> torch.Tensor:
        """Write [audio][BOS] of every sequence into ``cache`` (per-sequence lengths S_i + 1).

        Returns logits (B, 1, K, V) at each sequence's BOS position. Counts one decoder call."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, cache, tree_mask: torch.Tensor | None = None):
        """One decoder call over k new tokens per sequence.

        tokens (B, k) are written at cache positions lengths[b] .. lengths[b] + k - 1 and the
        cache lengths advance by k; logits (B, k, K, V). Roll back with ``cache.truncate``.
        Counts one decoder call."""
        raise NotImplementedError
