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
heads 2..n need probabilities: head 1's token is an argmax. When every live row feeds the same
number of tokens (always so above threshold 1) there is no padding, gather or rollback at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from speechllama.decoding.base import (
    DecoderModel,
    DecodingState,
    Strategy,
    block_lookahead,
    fast_argmax,
    heads_used,
)
from speechllama.decoding.options import DecodingOptions


class ThresholdDecoder(Strategy):
    """Keep heads 2..n's tokens while their probability >= ``options.threshold``."""

    name = "threshold"

    def __init__(self, options: DecodingOptions) -> None:
        super().__init__(options)
        self.lookahead = block_lookahead(options)
        t = options.threshold
        self.log_threshold = math.log(t) if t > 0 else -math.inf

    def keep(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, n, V) of all heads at one position -> tokens (B, n), counts (B,) in 1..n.

        log p_k = max logit - logsumexp is the log-probability of head k's own argmax;
        comparing it with log(threshold) saves an exp over the batch."""
        tokens = fast_argmax(logits)  # (B, n)
        rest = logits[:, 1:]
        log_p = rest.amax(dim=-1) - rest.logsumexp(dim=-1)  # (B, n - 1)
        confident = (log_p >= self.log_threshold).long()
        return tokens, 1 + confident.cumprod(dim=1).sum(dim=1)

    def _emit(self, logits: torch.Tensor, state: DecodingState) -> None:
        """Accept each live row's kept tokens and remember them: the next call feeds them.

        A live row appended all its kept tokens (a cut by EOS or the limit finishes it), so the
        per-row counts the next call feeds are known on the host without another transfer."""
        tokens, counts = self.keep(logits)
        added = state.accept_blocks(tokens, counts)
        state.scratch["pending"] = tokens
        pairs = zip(added, state.finished, strict=True)
        state.scratch["counts"] = [0 if done else a for a, done in pairs]

    def start(
        self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState
    ) -> None:
        heads_used(logits, self)
        self._emit(logits[:, 0], state)

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        pending: torch.Tensor = state.scratch["pending"]  # (B, n)
        counts: list[int] = state.scratch["counts"]  # tokens each row feeds, 0 when finished
        B, n = pending.shape
        width = max(counts)
        fed = pending[:, :width]
        ragged = any(c != width for c in counts)
        if ragged:
            device = pending.device
            fed_counts = torch.tensor(counts, device=device)
            pad = torch.arange(width, device=device)[None, :] >= fed_counts[:, None]
            fed = fed.masked_fill(pad, state.pad_id)
            last = torch.tensor([max(c - 1, 0) for c in counts], device=device)
        before = cache.lengths.clone()
        logits = model.step(fed, cache, num_heads=n)  # (B, width, n, V)
        if ragged:  # each row's last real position; roll back the padding
            rows = logits[torch.arange(B, device=logits.device), last]  # (B, n, V)
            cache.truncate(before + fed_counts)
        else:
            rows = logits[:, -1]
        self._emit(rows, state)


STRATEGY = ThresholdDecoder
