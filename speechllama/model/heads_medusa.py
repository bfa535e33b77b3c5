"""``medusa`` heads (Cai et al. 2024), for comparison with the paper's kinds on the same data.

Head 1 is the plain output layer. Head k = 2..K maps the trunk state h through
``medusa_blocks`` residual blocks z <- z + SiLU(W z + b) and then through the shared
un-embedding (Medusa gives each head its own copy of the LM head; sharing it keeps the added
parameters at (K-1)·blocks·(d² + d), independent of the vocabulary, like ``latent``).

W and b start at zero, so every block starts as the identity (SiLU(0) = 0) and every head
starts as head 1, as in Medusa; the gradient of W is not zero there (SiLU'(0) = 1/2), so the
heads still learn. All heads' blocks run as one batched matmul per block depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechllama.model.config import ModelConfig
from speechllama.model.heads import OutputHeads, register, tie_target


class MedusaHeads(OutputHeads):
    """``weight`` (blocks, K-1, d, d) and ``bias`` (blocks, K-1, d): block i of head k is
    ``weight[i, k - 2]`` (out x in, as ``nn.Linear``) and ``bias[i, k - 2]``."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        d = cfg.decoder
        super().__init__(d.d_model, d.vocab_size, cfg.heads.num_heads, tie_target(cfg, embedding))
        shape = (cfg.heads.medusa_blocks, self.num_heads - 1, d.d_model)
        self.weight = nn.Parameter(torch.zeros(*shape, d.d_model))
        self.bias = nn.Parameter(torch.zeros(shape))

    def logits(self, hidden: torch.Tensor, n: int, decode: bool = False) -> torch.Tensor:
        """hidden (B, T, d) -> latents (B, T, n, d) -> logits (B, T, n, V)."""
        unembed = self.proj.weight
        first = self.linear(hidden, "proj", unembed, decode).unsqueeze(-2)
        if n == 1:
            return first
        lead, d = hidden.shape[:-1], hidden.shape[-1]
        w, b = self.weight[:, : n - 1], self.bias[:, : n - 1]
        # Block 0 reads the same h for every head: one d -> (n-1)·d matmul.
        z = hidden.unsqueeze(-2) + F.silu(F.linear(hidden, w[0].reshape(-1, d)).view(
            *lead, n - 1, d) + b[0])  # fmt: skip
        for i in range(1, w.shape[0]):  # deeper blocks: one batched matmul over the heads
            z = z + F.silu(torch.einsum("...ki,koi->...ko", z, w[i]) + b[i])
        # Head 1 un-embedded on its own: the same matmul as n = 1, so bitwise n = 1's logits.
        return torch.cat([first, self.linear(z, "proj", unembed, decode)], dim=-2)


@register("medusa")
def _medusa(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    return MedusaHeads(cfg, embedding)
