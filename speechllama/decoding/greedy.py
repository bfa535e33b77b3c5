"""Greedy decoding: one token per decoder call, head 1's argmax. The reference every faster
strategy is measured against (and, for the lossless ones, must reproduce token for token)."""

from __future__ import annotations

from typing import Any

from speechllama.decoding.base import DecoderModel, DecodingState, Strategy, feed


class GreedyDecoder(Strategy):
    """Feed each live sequence its last kept token, keep head 1's argmax.

    After the prefill the cache holds [audio][BOS] and every live sequence has one kept token
    that is not yet in the cache; each call writes that token and predicts the next. Extra
    heads (K > 1), if the model has them, are ignored."""

    name = "greedy"
    lookahead = 1

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        live = state.live
        fed = [[state.tokens[b][-1]] if b in live else [] for b in range(state.batch_size)]
        logits = feed(model, cache, fed, state.pad_id)  # (B, 1, K, V)
        best = logits[:, 0, 0].argmax(dim=-1).tolist()
        for b in live:
            state.accept(b, [best[b]])


STRATEGY = GreedyDecoder
