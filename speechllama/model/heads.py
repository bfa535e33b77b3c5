"""Output heads: decoder hidden states -> logits for the next K tokens.

Every head architecture returns logits (B, T, K, V), where ``logits[:, t, k]`` predicts the
token k + 1 places after position t (k = 0 is the ordinary next-token head). Strategies see only
that tensor (through ``SpeechLLaMA.step``), so a head kind is added by registering a builder
here and nothing else changes.

Kinds are registered by name in ``HEADS``; :func:`build_heads` picks one by
``HeadsConfig.kind``. Implemented: ``linear`` (K = 1). Planned: ``projection``, ``latent``,
``medusa``, ``layer``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from speechllama.model.config import ModelConfig


class OutputHeads(nn.Module):
    """Base class. ``num_heads`` = K; ``forward(hidden (B, T, d)) -> logits (B, T, K, V)``."""

    num_heads: int

    def load_unembedding(self, weight: torch.Tensor) -> None:
        """Start from a pretrained LM's output matrix (V, d), e.g. when the decoder comes from a
        Hugging Face LLaMA with untied embeddings. Tied heads already share the embedding."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from an unembedding")


HeadBuilder = Callable[[ModelConfig, nn.Embedding], OutputHeads]
HEADS: dict[str, HeadBuilder] = {}


def register(kind: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator: make ``build_heads`` build ``kind`` with the decorated function."""

    def add(builder: HeadBuilder) -> HeadBuilder:
        HEADS[kind] = builder
        return builder

    return add


class LinearHead(OutputHeads):
    """The plain LM output layer (K = 1): logits = hidden @ W^T.

    When tied, ``proj.weight`` *is* the decoder's embedding parameter (one tensor, counted and
    trained once; checkpoint writers must handle the shared storage)."""

    def __init__(self, d_model: int, vocab_size: int, tie_to: nn.Embedding | None) -> None:
        super().__init__()
        self.num_heads = 1
        self.tied = tie_to is not None
        self.proj = nn.Linear(d_model, vocab_size, bias=False)
        if tie_to is not None:
            self.proj.weight = tie_to.weight
        else:
            nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d) -> logits (B, T, 1, V)."""
        return self.proj(hidden).unsqueeze(2)

    def load_unembedding(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.proj.weight.copy_(weight)


@register("linear")
def _linear(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    if cfg.heads.num_heads != 1:
        raise ValueError(
            f"heads.kind='linear' is the single next-token layer; num_heads={cfg.heads.num_heads}"
            " needs a multi-token kind"
        )
    d = cfg.decoder
    return LinearHead(d.d_model, d.vocab_size, embedding if d.tie_embeddings else None)


def build_heads(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    """The heads named by ``cfg.heads.kind``; ``embedding`` is the decoder's token embedding
    (shared with the output layer when ``cfg.decoder.tie_embeddings``)."""
    try:
        builder = HEADS[cfg.heads.kind]
    except KeyError:
        raise ValueError(
            f"unknown heads.kind {cfg.heads.kind!r}; available: {', '.join(sorted(HEADS))}"
        ) from None
    return builder(cfg, embedding)
