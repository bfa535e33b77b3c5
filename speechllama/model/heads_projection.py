"""``projection`` heads: K independent d x V output matrices on the shared trunk (Medusa's and
Gloeckle et al.'s layout, the paper's first variant).

Head 1 is the model's own output layer ``proj`` (tied to the embedding when configured); heads
2..K are one extra (K-1, V, d) tensor, so all of them are one matmul whatever K. Adds
(K-1)·d·V parameters: with a large vocabulary this dwarfs a small decoder, which is why the
paper prefers ``latent``.
"""

from __future__ import annotations

import torch
from torch import nn

from speechllama.model.config import ModelConfig
from speechllama.model.heads import OutputHeads, register, tie_target


class ProjectionHeads(OutputHeads):
    """``extra[k - 2]`` (V, d) is head k's output matrix, k = 2..K; each starts as a copy of
    head 1's, so a fresh model predicts the next token from every head."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        d = cfg.decoder
        super().__init__(d.d_model, d.vocab_size, cfg.heads.num_heads, tie_target(cfg, embedding))
        self.extra = nn.Parameter(torch.empty(self.num_heads - 1, d.vocab_size, d.d_model))
        self._copy_head_one()

    def _copy_head_one(self) -> None:
        with torch.no_grad():
            self.extra.copy_(self.proj.weight.expand_as(self.extra))

    def logits(self, hidden: torch.Tensor, n: int, decode: bool = False) -> torch.Tensor:
        """hidden (B, T, d) -> logits (B, T, n, V): head 1, then heads 2..n in one matmul."""
        first = self.linear(hidden, "proj", self.proj.weight, decode).unsqueeze(-2)
        if n == 1:
            return first
        d, vocab = hidden.shape[-1], self.proj.out_features
        rest = self.linear(hidden, "extra", self.extra[: n - 1].reshape(-1, d), decode)
        return torch.cat([first, rest.reshape(*hidden.shape[:-1], n - 1, vocab)], dim=-2)

    def load_unembedding(self, weight: torch.Tensor) -> None:
        super().load_unembedding(weight)
        self._copy_head_one()


@register("projection")
def _projection(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    return ProjectionHeads(cfg, embedding)
