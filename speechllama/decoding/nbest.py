"""N-best lists for minimum word error rate (MWER) training: the finished hypotheses of a beam
search, through the same decoding loop (and so the same length limits and decoder-call
accounting) as ``transcribe``.

Inputs are audio embeddings, as for :func:`speechllama.decoding.base.decode`: the search
starts at the decoder's prefill, and a training batch reaches embeddings by different roads
(features through the encoder, cached encoder outputs through the adapter alone: see
``speechllama.train.step.embed``), so the caller takes that road once and the search does not
repeat it. Length limits come from the audio durations, as everywhere: pass the batch's
``durations`` to get exactly ``transcribe``'s limits; without them they are estimated from the
embedding count (100 feature frames per second, the encoder's subsampling, the adapter's
stack), which is close but can differ by a token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speechllama.decoding.base import decode
from speechllama.decoding.beam import BeamDecoder
from speechllama.decoding.beam_search import BeamHypothesis, BeamSearchStrategy, normalised
from speechllama.decoding.options import DecodingOptions
from speechllama.decoding.prefix_beam import PrefixBeamDecoder

__all__ = ["FRAMES_PER_SECOND", "Hypothesis", "nbest", "nbest_embeddings"]

# Feature frames per second of audio (both front ends hop 10 ms: speechllama.features).
FRAMES_PER_SECOND = 100.0


@dataclass(frozen=True)
class Hypothesis:
    """One entry of an N-best list. tokens: transcript tokens without BOS/EOS; score: its total
    log-probability, unnormalised (``beam``, and ``prefix-beam`` with ``prefix_rescore``: head
    1's log-prob of the tokens and of the EOS that ended them, what MWER's
    ``sequence_log_probs`` computes; plain ``prefix-beam``: the sum of the heads' log-probs
    along the blocks the search built it from)."""

    tokens: tuple[int, ...]
    score: float


def nbest(
    model,
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    options: DecodingOptions,
    n: int,
    *,
    durations: Sequence[float] | None = None,
) -> list[list[Hypothesis]]:
    """Up to ``n`` distinct hypotheses per utterance, best first, without gradients.

    audio (B, S, d_dec) audio embeddings (``model.encode(features, feature_lens)``, or the
    adapter on cached encoder outputs), audio_lens (B,); ``durations`` (B,) seconds set the
    length limits (see the module doc). Uses ``prefix-beam`` when ``options.strategy ==
    "prefix-beam"`` and the model decodes with more than one head, else ``beam``, with a beam
    of ``max(options.beam_size, n)``. "Best" is the search's own ranking,
    ``score / L ** options.length_penalty`` (L = tokens, + 1 for the EOS that ended it); set
    ``length_penalty=0`` to rank by ``score``. Every module runs in eval mode for the search
    (no dropout) and gets its own mode back. Audio that leaves no room for a transcript in the
    decoder raises ``SequenceTooLongError``.
    """
    if durations is None:
        cfg = model.config
        per = cfg.encoder.subsampling * cfg.adapter.stack / FRAMES_PER_SECOND
        durations = [float(x) * per for x in audio_lens.tolist()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        lists = nbest_embeddings(model, audio, audio_lens, durations, options, n)
    finally:
        for module, training in modes:
            module.training = training
    return [[Hypothesis(h.tokens, h.score) for h in hyps] for hyps in lists]


def nbest_embeddings(
    model,
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    durations: Sequence[float],
    options: DecodingOptions,
    n: int,
) -> list[list[BeamHypothesis]]:
    """:func:`nbest` from audio embeddings (B, S, d_dec), lens (B,): the search's own
    hypotheses (with their per-call blocks), ``options.batch_size`` utterances per search."""
    if n < 1:
        raise ValueError(f"nbest: n={n} must be at least 1")
    options = dataclasses.replace(options, beam_size=max(options.beam_size, n))
    cfg = model.config
    multi = (options.num_heads or cfg.heads.num_heads) > 1
    kind = PrefixBeamDecoder if options.strategy == "prefix-beam" and multi else BeamDecoder
    out: list[list[BeamHypothesis]] = []
    step = max(1, options.batch_size)
    with torch.no_grad():
        for i in range(0, audio.shape[0], step):
            lens = audio_lens[i : i + step]
            sink: list[list[BeamHypothesis]] = []
            strategy: BeamSearchStrategy = kind(options, sink)
            decode(model, strategy, audio[i : i + step, : int(lens.max())], lens,
                   durations[i : i + step], eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                   max_seq_len=cfg.decoder.max_seq_len)  # fmt: skip
            out += sink
    alpha = options.length_penalty
    return [sorted(hyps, key=lambda h: -normalised(h.score, h.scored, alpha))[:n] for hyps in out]
