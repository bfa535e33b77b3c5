"""The strategy interface and the one short loop that drives every strategy.

A strategy decides, call by call, which tokens to feed the decoder and which of the predicted
tokens to keep; the loop around it owns what every strategy would otherwise repeat: the cache,
the prefill, per-sequence call counts and timing. Like openai/whisper's ``TokenDecoder``, a
strategy never touches the encoder, the tokenizer or the text.

Conventions shared by all strategies:

- One ``advance()`` makes exactly one batched decoder call (``model.step``). The loop charges
  that call to every sequence that was still live before it, so a batch of B live sequences
  costs each of them one call.
- Finished sequences are fed a pad token and rolled back to their previous length after each
  call, so they never grow, until the loop drops them from the batch: once a quarter of its
  rows have finished, their cache rows and per-row state go (``compact_finished``), so a batch
  does not pay full width for as many calls as its slowest row needs. Results keep the
  batch's order. A strategy keeps per-row values in ``state.scratch`` (cut with the rows) and
  batch-wide ones in ``state.shared``.
- ``accepted_per_call[i]`` counts calls that appended ``i`` tokens to a sequence; the EOS that
  ends a sequence is not a token, so a call that only produced EOS counts under ``i = 0`` and
  ``sum(i * n_i) == len(tokens)``.
- Every sequence has a hard length limit from its audio duration, so decoding always stops;
  a repetition guard in ``DecodingState.accept`` (``state.looping``) ends a loop sooner.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from speechllama.decoding.options import DecodingOptions
from speechllama.decoding.state import DecodingState

__all__ = [
    "Decoded",
    "DecoderModel",
    "DecodingState",
    "SequenceTooLongError",
    "Strategy",
    "block_lookahead",
    "decode",
    "fast_argmax",
    "feed",
    "heads_used",
    "max_tokens_for",
]


class DecoderModel(Protocol):
    """What decoding needs from a model (``SpeechLLaMA`` provides it)."""

    decoder_calls: int

    def new_cache(self, batch_size: int, max_len: int) -> Any: ...

    def prefill(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        cache: Any,
        num_heads: int | None = None,
    ) -> torch.Tensor: ...

    def step(
        self,
        tokens: torch.Tensor,
        cache: Any,
        tree_mask: torch.Tensor | None = None,
        num_heads: int | None = None,
    ) -> torch.Tensor: ...


class SequenceTooLongError(ValueError):
    """The audio embeddings leave no room for a transcript in the decoder's context."""


@dataclass(frozen=True)
class Decoded:
    """The strategy-level outcome of one sequence; text and encoder time are added by callers."""

    tokens: tuple[int, ...]
    decoder_calls: int
    accepted_per_call: tuple[int, ...]
    decoder_seconds: float


class Strategy(ABC):
    """One decoding strategy. Subclasses implement ``advance`` (one decoder call) and may
    override ``start`` (what to do with the prefill logits) and ``finalize``.

    ``lookahead`` is the most tokens a strategy feeds in one call beyond a sequence's kept
    length; the loop reserves that much cache room so a proposal never overflows it.
    ``num_heads`` is what the loop's prefill asks the model for (``options.num_heads`` unless a
    strategy knows it needs fewer); a strategy's steps must ask for the same n.
    """

    name: str = "base"
    lookahead: int = 1
    # True for a strategy that decodes from its own copy of the cache after ``start`` (the beam
    # searches): the loop's cache is then idle, so the loop never compacts it (a wasted copy).
    own_cache: bool = False

    def __init__(self, options: DecodingOptions) -> None:
        self.options = options

    @property
    def num_heads(self) -> int | None:
        """Heads to compute in the prefill and every step; None: all K of the model."""
        return self.options.num_heads

    def start(self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState):
        """Consume the prefill logits (B, 1, K, V). Default: keep head 1's argmax."""
        first = logits[:, 0, 0].argmax(dim=-1).tolist()
        for b in state.live:
            state.accept(b, [first[b]])

    @abstractmethod
    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        """Make one decoder call for the live sequences and ``state.accept`` their tokens."""

    def finalize(self, state: DecodingState) -> list[tuple[int, ...]]:
        """The final token sequence of each batch row."""
        return [tuple(t) for t in state.tokens]


_ARGMAX_CHUNK = 64


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``, the same indices (the first of ties), faster for large CPU inputs.

    Torch's CPU argmax is not vectorised (about 1.5 ns per element on this machine) while
    ``amax`` is, so a large input is reduced in chunks of 64: amax per chunk, argmax over the
    chunk maxima (the first chunk that holds the maximum), then argmax inside that chunk.
    Measured with one thread, logits (8, 4, 4, V): V = 1024, 200 -> 56 us; V = 49152, 7.9 ->
    1.7 ms. Small inputs, other devices and vocabularies that are not a multiple of 64 take
    plain argmax."""
    *lead, V = x.shape
    if x.device.type != "cpu" or V % _ARGMAX_CHUNK or x.numel() < 1 << 15:
        return x.argmax(dim=-1)
    rows = x.reshape(-1, V // _ARGMAX_CHUNK, _ARGMAX_CHUNK)
    chunk = rows.amax(dim=-1).argmax(dim=-1)  # (R,)
    inside = rows.gather(1, chunk[:, None, None].expand(-1, 1, _ARGMAX_CHUNK))[:, 0]
    return (chunk * _ARGMAX_CHUNK + inside.argmax(dim=-1)).view(lead)


# Cache room reserved by the strategies that feed up to K tokens per call when the options
# leave K to the model (``num_heads=None``); a model with more heads needs ``num_heads`` set.
MAX_DEFAULT_HEADS = 8


def draft_threshold(options: DecodingOptions) -> float:
    """``options.draft_threshold`` of the strategies that gate their proposals on it (verify,
    tree), checked: a probability in [0, 1]; 0 feeds every proposal."""
    p = options.draft_threshold
    if isinstance(p, str):
        raise ValueError(
            f"draft threshold {p!r} is measured on a model: build the strategy with "
            "get_strategy(options, model)"
        )
    if not 0 <= p <= 1:
        raise ValueError(f"draft threshold must lie in [0, 1], got {p}")
    return p


def block_lookahead(options: DecodingOptions) -> int:
    """The ``lookahead`` of a strategy that feeds up to ``num_heads`` tokens per call."""
    return options.num_heads or MAX_DEFAULT_HEADS


def heads_used(logits: torch.Tensor, strategy: Strategy) -> int:
    """n, the heads of the prefill logits (B, 1, n, V), after checking the cache room reserved
    for ``strategy`` (its ``lookahead``) covers a call of n tokens."""
    n = logits.shape[2]
    if n > strategy.lookahead:
        raise ValueError(
            f"the model has {n} heads, more than the {strategy.lookahead} that strategy "
            f"{strategy.name!r} reserves room for by default; set num_heads"
        )
    return n


def feed(
    model: DecoderModel,
    cache: Any,
    new_tokens: Sequence[Sequence[int]],
    pad_id: int,
    num_heads: int | None = None,
) -> torch.Tensor:
    """One decoder call over ragged per-sequence token lists.

    ``new_tokens[b]`` (possibly empty, e.g. for finished rows) is right-padded to the longest
    list; causal attention keeps the pads from influencing the real positions, and the cache is
    rolled back so each row grows by exactly ``len(new_tokens[b])``. Returns logits (B, k, K, V);
    row b's prediction after its last real token is at index ``len(new_tokens[b]) - 1``.
    ``num_heads`` is passed on to ``model.step`` when given (use the prefill's, i.e. the
    strategy's ``num_heads``, for every call of one cache).
    """
    lengths = cache.lengths.clone()
    width = max(1, max(len(t) for t in new_tokens))
    batch = torch.full((len(new_tokens), width), pad_id, dtype=torch.long, device=lengths.device)
    for b, toks in enumerate(new_tokens):
        if toks:
            batch[b, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
    counts = torch.tensor([len(t) for t in new_tokens], dtype=lengths.dtype, device=lengths.device)
    if num_heads is None:
        logits = model.step(batch, cache)
    else:
        logits = model.step(batch, cache, num_heads=num_heads)
    if bool((counts != width).any()):
        cache.truncate(lengths + counts)
    return logits


def max_tokens_for(duration: float, options: DecodingOptions) -> int:
    """The transcript length limit for ``duration`` seconds of audio."""
    return options.max_tokens_min + math.ceil(max(0.0, duration) * options.max_tokens_per_second)


# Compact once this share of the current rows has finished (see ``compact_finished``).
COMPACT_SHARE = 0.25


def compact_finished(state: DecodingState, cache: Any) -> bool:
    """Drop the finished rows from the batch once they are ``COMPACT_SHARE`` of it: their
    cache rows (``cache.reorder``: keys, values of every layer, the heads' extra cache layers
    included, and lengths) and their per-row state (``state.compact``), so that every later
    call is as wide as the rows that still need it rather than the batch the loop started
    with. Their results wait in ``state`` until ``restore``. Returns whether it compacted.

    Why not at every finished row: the reorder copies the whole cache. Measured at batch 8
    (one thread, shared 2-core CPU), dropping one row costs 3% of a one-token call on the
    ``tiny`` decoder, 5% on ``small`` with latent heads and 13% with ``layer`` heads (their
    extra cache layers); waiting for a quarter of the rows bounds the copies per batch, and on
    ``tiny`` decoded as fast as compacting at every finished row. What it buys (batch 8, same
    machine): 1.12-1.25x less decoder time for greedy/verify/threshold/tree on a trained
    ``tiny`` decoder with transcripts of 8-47 tokens, 1.01-1.04x when they are 21-35 tokens;
    1.13x (greedy) and 1.19x (verify) on ``small`` with limits of 34-76 tokens."""
    live = state.live
    finished = state.batch_size - len(live)
    if not live or finished == 0 or finished < COMPACT_SHARE * state.batch_size:
        return False
    cache.reorder(torch.tensor(live, dtype=torch.long, device=cache.lengths.device))
    state.compact(live)
    return True


def decode(
    model: DecoderModel,
    strategy: Strategy,
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    durations: Sequence[float],
    eos_id: int,
    pad_id: int,
    max_seq_len: int,
    compact: bool = True,
) -> list[Decoded]:
    """Decode a batch of audio embeddings with ``strategy``; results in the batch's order.

    audio (B, S, d_model) audio embeddings, audio_lens (B,), ``durations`` in seconds (they set
    each sequence's length limit). ``max_seq_len`` is the decoder context; a sequence whose
    audio alone fills it raises ``SequenceTooLongError`` (callers check lengths beforehand).
    The prefill's time is split by audio length, each later call's time evenly over the
    sequences it served. With ``compact`` finished rows leave the batch (see
    :func:`compact_finished`); without, they ride along to the end (padding calls): the
    results are the same either way.
    """
    options = strategy.options
    lens = [int(n) for n in audio_lens.tolist()]
    room = [max_seq_len - n - 1 - strategy.lookahead for n in lens]
    if any(r < 1 for r in room):
        raise SequenceTooLongError(
            f"audio of {max(lens)} embeddings leaves no room in a {max_seq_len}-token decoder"
        )
    limits = [min(max_tokens_for(d, options), r) for d, r in zip(durations, room, strict=True)]
    state = DecodingState(eos_id=eos_id, pad_id=pad_id, max_tokens=limits)
    cache_len = max(n + 1 + m + strategy.lookahead for n, m in zip(lens, limits, strict=True))
    cache = model.new_cache(len(lens), cache_len)

    calls0 = model.decoder_calls
    t0 = time.perf_counter()
    logits = model.prefill(audio, audio_lens, cache, num_heads=strategy.num_heads)
    strategy.start(model, cache, logits, state)
    elapsed = time.perf_counter() - t0
    total = sum(lens) or 1
    everyone = list(range(len(lens)))
    state.charge(everyone, model.decoder_calls - calls0, [elapsed * n / total for n in lens])

    while not state.done:
        t0 = time.perf_counter()
        if compact and not strategy.own_cache:  # the copy is part of this call's cost
            compact_finished(state, cache)
        live = state.live
        calls0 = model.decoder_calls
        strategy.advance(model, cache, state)
        elapsed = time.perf_counter() - t0
        calls = model.decoder_calls - calls0
        if calls == 0 and state.live == live:
            raise RuntimeError(f"strategy {strategy.name!r} made no progress")
        state.charge(live, calls, [elapsed / len(live)] * len(live))

    state.restore()
    finals = strategy.finalize(state)
    return [
        Decoded(
            tokens=finals[b],
            decoder_calls=state.calls[b],
            accepted_per_call=tuple(state.histogram[b]),
            decoder_seconds=state.decoder_seconds[b],
        )
        for b in range(len(lens))
    ]
