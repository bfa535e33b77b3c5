"""Whisper's audio encoder, run on the true input length.

Architecture (Radford et al. 2022): two Conv1d layers with GELU (the second has stride 2, so
100 mel frames/s become 50 hidden frames/s), a sinusoidal positional table added to the conv
output, pre-LayerNorm transformer blocks with a GELU MLP, and a final LayerNorm.

Unlike the reference implementation we do not pad to 30 s: the positional table is sliced to the
actual number of frames, which is what CTranslate2 does too and is several times faster on short
utterances. Inputs longer than the table (1500 output frames = 30 s) are refused; the caller
segments long audio.

The query/key/value projections are one fused ``Linear(d, 3d)`` (one matmul instead of three,
and the CTranslate2 layout). Whisper's key projection has no bias; the fused bias slot for keys
is loaded as zeros, and since a key bias adds the same ``q . b`` to every score of a query it
would cancel in the softmax anyway.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from speechllama.model.encoder_common import (
    SpeechEncoder,
    attention_mask,
    conv_out_lengths,
    valid_mask,
    zero_padding,
)

WHISPER_MAX_FRAMES = 1500  # output frames in 30 s of audio


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's positional table (length, channels): sines in the first half of the channels,
    cosines in the second, timescales geometric from 1 to ``max_timescale``."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    half = channels // 2
    step = math.log(max_timescale) / max(half - 1, 1)
    inv_timescales = torch.exp(-step * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class WhisperAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused QKV projection."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d); key_mask (B, 1, 1, T) bool or None -> (B, T, d)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=key_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class WhisperBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(d_model)
        self.attn = WhisperAttention(d_model, n_heads, dropout)
        self.mlp_ln = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_ln(x), key_mask))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.mlp_ln(x)))))


class WhisperEncoder(SpeechEncoder):
    """Whisper encoder: features (B, T, n_mels) log-mel -> (B, ceil(T/2), d_model)."""

    def __init__(
        self,
        n_mels: int = 80,
        d_model: int = 384,
        n_layers: int = 4,
        n_heads: int = 6,
        d_ff: int = 1536,
        dropout: float = 0.0,
        max_frames: int = WHISPER_MAX_FRAMES,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"whisper d_model={d_model} must divide by n_heads={n_heads}")
        self.n_mels = n_mels
        self.n_heads = n_heads
        self.output_dim = d_model
        self.max_frames = max_frames
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        # Persistent so a loaded checkpoint's table is used verbatim (it is sinusoids() anyway).
        self.register_buffer("positions", sinusoids(max_frames, d_model))
        self.blocks = nn.ModuleList(
            WhisperBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        self.ln_post = nn.LayerNorm(d_model)
        self.train_top = 0  # the top blocks that train in a frozen encoder (set_train_top)

    @property
    def max_input_frames(self) -> int:
        """The longest input (feature frames) the positional table allows."""
        return 2 * self.max_frames

    @staticmethod
    def output_lengths(lens: torch.Tensor) -> torch.Tensor:
        """Frames out for ``lens`` frames in: ceil(lens / 2) (the stride-2 conv)."""
        return conv_out_lengths(lens, kernel=3, stride=2, padding=1)

    def forward(
        self, features: torch.Tensor, lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, n_mels), lens (B,) -> hidden (B, T', d_model), lens' (B,).

        Hidden frames past each sequence's length are zero. Raises ``ValueError`` when T' would
        exceed the positional table (30 s for Whisper).
        """
        x, out_lens = self.lower(features, lens)
        return self.upper(x, out_lens)

    def lower(
        self, features: torch.Tensor, lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part: convs, positions and all blocks but the top ``train_top`` ->
        (B, T', d_model), lens' (B,). What training caches when the top blocks train."""
        self.check_inputs(features, lens, self.n_mels)
        t_in = features.shape[1]
        t_out = int(self.output_lengths(torch.tensor(t_in)))
        if t_out > self.max_frames:
            raise ValueError(
                f"whisper encoder input of {t_in} frames gives {t_out} > {self.max_frames} "
                f"output frames (30 s); segment the audio first"
            )
        in_mask = valid_mask(lens, t_in)
        x = zero_padding(features.transpose(1, 2), in_mask)
        x = zero_padding(F.gelu(self.conv1(x)), in_mask)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', d)
        out_lens = self.output_lengths(lens)
        x = x + self.positions[:t_out].to(x.dtype)
        key_mask = attention_mask(valid_mask(out_lens, t_out))
        for block in self.blocks[: len(self.blocks) - self.train_top]:
            x = block(x, key_mask)
        return x, out_lens

    def upper(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``train_top`` blocks and the final LayerNorm over :meth:`lower`'s output
        x (B, T', d_model), lens (B,) -> hidden (B, T', d_model) zero past each length."""
        out_mask = valid_mask(lens, x.shape[1])
        key_mask = attention_mask(out_mask)
        for block in self.blocks[len(self.blocks) - self.train_top :]:
            x = block(x, key_mask)
        x = self.ln_post(x)
        if key_mask is not None:
            x = x * out_mask.unsqueeze(-1).to(x.dtype)
        return x, lens

    def set_train_top(self, n: int) -> None:
        """Let the top ``n`` blocks and the final LayerNorm train while the rest stays frozen
        (call after :meth:`freeze`). Whisper's dropout is 0, so the pinned eval mode changes
        nothing for them."""
        if not 0 <= n <= len(self.blocks):
            raise ValueError(f"train_top must lie in 0..{len(self.blocks)}, got {n}")
        self.train_top = n
        for module in [*self.blocks[len(self.blocks) - n :], self.ln_post] if n else []:
            module.requires_grad_(True)

    def top_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (under this module) of the parameters :meth:`set_train_top`
        trains: what a checkpoint stores over the sourced weights."""
        if not self.train_top:
            return ()
        first = len(self.blocks) - self.train_top
        return (*(f"blocks.{i}." for i in range(first, len(self.blocks))), "ln_post.")
