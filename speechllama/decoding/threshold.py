"""Threshold-based multi-token decoding (the paper's first strategy): each call keeps head 1's
argmax and then heads 2..n's argmaxes while each one's probability is at least ``threshold``,
stopping at the first that is not. Kept tokens are never checked, so a confident wrong guess
changes the transcript: lower thresholds mean fewer calls and more risk. With a threshold
above 1 no extra head is ever kept and this is greedy decoding, call for call.

One call, per sequence: feed the c tokens kept by the previous call (1 <= c <= n; none of them
is in the cache yet), read all n heads at the last of them, keep 1 + (the number of leading
heads 2..n at or above the threshold). Batched: rows feed different c, so the block is padded
to the longest and each row's cache is rolled back to its own length (causal attention keeps
the padding from influencing the real positions); finished rows are fed padding only.

Only the n rows of logits at one position per sequence go through a (log-)softmax, and only
heads 2..n need probabilities: head 1's token is an argmax.
"""

from __future__ import annotations

from typing import Any

import torch

from speechllama.decoding.base import (
    DecoderModel,
    DecodingState,
    Strategy,
    block_lookahead,
    heads_used,
)
from speechllama.decoding.options import DecodingOptions


class ThresholdDecoder(Strategy):
    """Keep heads 2..n's tokens while their probability >= ``options.threshold``."""

    name = "threshold"

    def __init__(self, options: DecodingOptions) -> None:
        super().__init__(options)
        self.lookahead = block_lookahead(options)

    def keep(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, n, V) of all heads at one position -> tokens (B, n), counts (B,) in 1..n.

        p_k = exp(max logit - logsumexp) is head k's probability of its own argmax."""
        best, tokens = logits.max(dim=-1)  # (B, n)
        p = (best[:, 1:] - logits[:, 1:].logsumexp(dim=-1)).exp()
        confident = (p >= self.options.threshold).long()
        return tokens, 1 + confident.cumprod(dim=1).sum(dim=1)

    def _emit(self, logits: torch.Tensor, state: DecodingState) -> None:
        """Accept each live row's kept tokens and remember them: the next call feeds them."""
        tokens, counts = self.keep(logits)
        added = state.accept_blocks(tokens, counts)
        state.scratch["pending"] = tokens
        state.scratch["counts"] = counts
        state.scratch["width"] = max([added[b] for b in state.live], default=1)

    def start(
        self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState
    ) -> None:
        heads_used(logits, self)
        self._emit(logits[:, 0], state)

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        pending: torch.Tensor = state.scratch["pending"]  # (B, n)
        n = pending.shape[1]
        width: int = state.scratch["width"]
        live = state.live_mask(pending.device)
        counts = state.scratch["counts"] * live  # (B,) tokens each row feeds
        real = torch.arange(width, device=pending.device)[None, :] < counts[:, None]
        fed = pending[:, :width].masked_fill(~real, state.pad_id)
        before = cache.lengths.clone()
        logits = model.step(fed, cache, num_heads=n)  # (B, width, n, V)
        at = (counts - 1).clamp(min=0)  # each row's last real position
        V = logits.shape[-1]
        rows = logits.gather(1, at[:, None, None, None].expand(-1, 1, n, V))[:, 0]
        cache.truncate(before + counts)
        self._emit(rows, state)


STRATEGY = ThresholdDecoder
