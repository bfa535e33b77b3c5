"""Greedy decoding: one token per decoder call, head 1's argmax. The reference every faster
strategy is measured against (and, for the lossless ones, must reproduce token for token)."""

from __future__ import annotations

from typing import Any

from speechllama.decoding.base import DecoderModel, DecodingState, Strategy, feed


class GreedyDecoder(Strategy):
    """Feed each live sequence its last kept token, keep head 1's argmax.

    After the prefill the cache holds [audio][BOS] and every live sequence has one kept token
    that is not yet in the cache; each call writes that token and predicts the next.

    Only head 1 is computed (prefill and steps), whatever K the model or the options have, so
    the baseline costs what a next-token (K = 1) model costs. Every head kind computes head 1
    with the same operations whatever n, so these logits are bitwise those of a K-head call
    and the lossless strategies still reproduce greedy token for token."""

    name = "greedy"
    lookahead = 1

    @property
    def num_heads(self) -> int:
        return 1

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        live = state.live
        fed = [[state.tokens[b][-1]] if b in live else [] for b in range(state.batch_size)]
        logits = feed(model, cache, fed, state.pad_id, num_heads=1)  # (B, 1, 1, V)
        best = logits[:, 0, 0].argmax(dim=-1).tolist()
        for b in live:
            state.accept(b, [best[b]])


STRATEGY = GreedyDecoder
