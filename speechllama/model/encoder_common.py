"""Pieces every speech encoder shares: length bookkeeping, padding masks, freezing.

Batches are right-padded: sequence ``b`` owns frames ``[0, lens[b])``. Every encoder must give
the valid frames of a padded batch the same outputs as the sequence run alone, so padding is
zeroed before each convolution (which then sees exactly the zero padding it would see at the
true length) and hidden from attention by a key mask.
"""

from __future__ import annotations

import torch
from torch import nn


def valid_mask(lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, max_len)`` bool, True on real frames."""
    positions = torch.arange(max_len, device=lens.device)
    return positions.unsqueeze(0) < lens.unsqueeze(1)


def conv_out_lengths(lens: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Output lengths of a ``Conv1d`` applied to each sequence at its true length."""
    return torch.div(lens + 2 * padding - kernel, stride, rounding_mode="floor") + 1


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded frames of channel-first ``x`` (B, C, T) given ``mask`` (B, T)."""
    return x * mask.unsqueeze(1).to(x.dtype)


def attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """``(B, T)`` valid mask -> ``(B, 1, 1, T)`` key mask for ``scaled_dot_product_attention``,
    or None when nothing is padded (lets PyTorch pick its fastest kernel)."""
    if bool(mask.all()):
        return None
    return mask[:, None, None, :]


class SpeechEncoder(nn.Module):
    """Base class: ``output_dim`` plus freezing that survives ``model.train()``.

    A frozen encoder keeps ``requires_grad=False`` and stays in eval mode even when the enclosing
    model is switched to training, so dropout never fires in a pretrained encoder that is only
    used as a feature extractor.
    """

    output_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def freeze(self) -> None:
        """Stop gradients and pin eval mode."""
        self.frozen = True
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SpeechEncoder:
        return super().train(mode and not self.frozen)

    @staticmethod
    def check_inputs(features: torch.Tensor, lens: torch.Tensor, n_mels: int) -> None:
        """Shape checks that give a clear message instead of a deep matmul error."""
        if features.dim() != 3 or features.shape[-1] != n_mels:
            raise ValueError(
                f"encoder expects features of shape (batch, frames, {n_mels}), "
                f"got {tuple(features.shape)}"
            )
        if lens.shape != (features.shape[0],):
            raise ValueError(
                f"encoder expects lens of shape ({features.shape[0]},), got {tuple(lens.shape)}"
            )
        if features.shape[0] and (int(lens.min()) < 1 or int(lens.max()) > features.shape[1]):
            raise ValueError(
                f"encoder lens must lie in 1..{features.shape[1]}, got {lens.tolist()}"
            )
