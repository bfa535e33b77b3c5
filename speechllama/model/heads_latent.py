"""``latent`` heads: latent-space expansion, the paper's preferred variant.

Head k's output matrix is factored as W_k = U·A_k: a full-rank d x d map A_k into a latent,
then the one shared un-embedding U (``proj``, the base model's output layer). All K maps are
stored as one (K·d, d) matrix, so heads 2..n are ONE d -> (n-1)·d matmul giving (B, T, n-1, d)
latents and ONE matmul of those with U^T, instead of n-1 full d x V products as separate calls.
Head 1 takes its own two matmuls: its logits are then the same floating-point operations on the
same shapes whatever n, bitwise equal to n = 1's (inside one wide matmul the kernel, and so the
rounding, depends on the other heads' rows), so greedy decoding can ask for one head and still
be what ``verify``/``tree`` check against. Adds K·d² parameters, independent of the vocabulary.

Initialisation: every A_k is the identity. Head 1 of a fresh (or :func:`expand_heads`-converted)
model then gives exactly the base model's logits, and heads 2..K start predicting the next
token too: a known-good point from which each A_k only has to learn the shift to token t + k,
rather than a random map that first destroys what U knows.
"""

from __future__ import annotations

import torch
from torch import nn

from speechllama.model.config import ModelConfig
from speechllama.model.heads import OutputHeads, register, tie_target


class LatentHeads(OutputHeads):
    """``maps`` (K·d, d): rows (k-1)·d .. k·d - 1 are A_k (head k's latent = A_k h)."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        d = cfg.decoder
        super().__init__(d.d_model, d.vocab_size, cfg.heads.num_heads, tie_target(cfg, embedding))
        self.maps = nn.Parameter(torch.eye(d.d_model).repeat(self.num_heads, 1))

    def logits(self, hidden: torch.Tensor, n: int, decode: bool = False) -> torch.Tensor:
        """hidden (B, T, d) -> latents (B, T, n, d) -> logits (B, T, n, V); head 1 apart."""
        d, unembed = hidden.shape[-1], self.proj.weight
        first = self.linear(self.linear(hidden, "map1", self.maps[:d], decode), "proj", unembed,
                            decode).unsqueeze(-2)  # fmt: skip
        if n == 1:
            return first
        latents = self.linear(hidden, "maps", self.maps[d : n * d], decode)
        latents = latents.reshape(*hidden.shape[:-1], n - 1, d)
        return torch.cat([first, self.linear(latents, "proj", unembed, decode)], dim=-2)


@register("latent")
def _latent(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    return LatentHeads(cfg, embedding)
