"""Beam search for next-token models (the standard baseline): every call extends each of the
``beam_size`` hypotheses of an utterance by one token from head 1, keeps the best
``beam_size`` over all of them, and reorders the KV cache by parent hypothesis.

Batched over utterances and beams: one decoder call feeds every open hypothesis of every
utterance (B x beam rows, one token each, so no padding). Scores are total log-probabilities;
finished hypotheses are ranked by ``score / L ** length_penalty`` (L = tokens + EOS) and kept
until no open hypothesis can rank above the worst of ``beam_size`` finished ones. The search
itself, and the choices it fixes, are in :mod:`speechllama.decoding.beam_search`; this module
only says "one head". With ``beam_size = 1`` and ``length_penalty = 0`` it is greedy decoding.
"""

from __future__ import annotations

from speechllama.decoding.beam_search import BeamSearchStrategy


class BeamDecoder(BeamSearchStrategy):
    """Next-token beam search on head 1 (whatever K the model has), one token per call."""

    name = "beam"
    lookahead = 1

    @property
    def num_heads(self) -> int:
        return 1


STRATEGY = BeamDecoder
