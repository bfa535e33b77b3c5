"""The strategy interface and the one short loop that drives every strategy.

A strategy decides, call by call, which tokens to feed the decoder and which of the predicted
tokens to keep; the loop around it owns what every strategy would otherwise repeat: the cache,
the prefill, per-sequence call counts and timing. Like openai/whisper's ``TokenDecoder``, a
strategy never touches the encoder, the tokenizer or the text.

Conventions shared by all strategies:

- One ``advance()`` makes exactly one batched decoder call (``model.step``). The loop charges
  that call to every sequence that was still live before it, so a batch of B live sequences
  costs each of them one call.
- Finished sequences stay in the batch (the static cache has fixed rows) but are fed a pad
  token and rolled back to their previous length after each call, so they never grow.
- ``accepted_per_call[i]`` counts calls that appended ``i`` tokens to a sequence; the EOS that
  ends a sequence is not a token, so a call that only produced EOS counts under ``i = 0`` and
  ``sum(i * n_i) == len(tokens)``.
- Every sequence has a hard length limit from its audio duration, so decoding always stops.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from speechllama.decoding.options import DecodingOptions


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


@dataclass
class DecodingState:
    """Mutable per-sequence bookkeeping for one batch (B sequences).

    ``tokens[b]`` holds the accepted transcript tokens of sequence b (no BOS, no EOS);
    ``max_tokens[b]`` is its hard length limit. ``scratch`` holds what a strategy carries from
    one call to the next for this batch (e.g. pending proposals as tensors), so that a
    ``Strategy`` instance keeps no per-batch state and can be reused across batches.
    """

    eos_id: int
    pad_id: int
    max_tokens: list[int]
    tokens: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    histogram: list[list[int]] = field(default_factory=list)
    decoder_seconds: list[float] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.max_tokens)
        self.tokens = [[] for _ in range(n)]
        self.finished = [limit <= 0 for limit in self.max_tokens]
        self.calls = [0] * n
        self.histogram = [[] for _ in range(n)]
        self.decoder_seconds = [0.0] * n

    @property
    def batch_size(self) -> int:
        return len(self.max_tokens)

    @property
    def live(self) -> list[int]:
        """Indices of the sequences that still need decoder calls."""
        return [b for b, done in enumerate(self.finished) if not done]

    @property
    def done(self) -> bool:
        return all(self.finished)

    def accept(self, b: int, proposed: Sequence[int]) -> int:
        """Append ``proposed`` tokens to sequence b, stopping at EOS or at the length limit.

        Called once per live sequence per decoder call; records that call in the histogram.
        Returns how many tokens were appended."""
        if self.finished[b]:
            raise RuntimeError(f"sequence {b} is already finished")
        added = 0
        for tok in proposed:
            tok = int(tok)
            if tok == self.eos_id:
                self.finished[b] = True
                break
            self.tokens[b].append(tok)
            added += 1
            if len(self.tokens[b]) >= self.max_tokens[b]:
                self.finished[b] = True
                break
        hist = self.histogram[b]
        while len(hist) <= added:
            hist.append(0)
        hist[added] += 1
        return added

    def accept_blocks(self, blocks: torch.Tensor, counts: torch.Tensor) -> list[int]:
        """``accept`` the first ``counts[b]`` tokens of ``blocks[b]`` (B, n) for every live b.

        One transfer of each tensor for the whole batch (the strategies that emit several
        tokens per call compute ``blocks`` and ``counts`` on the device). Returns the tokens
        appended per row (0 for rows that were already finished)."""
        rows, n = blocks.tolist(), counts.tolist()
        added = [0] * self.batch_size
        for b in self.live:
            added[b] = self.accept(b, rows[b][: n[b]])
        return added

    def room(self, device: torch.device | str) -> torch.Tensor:
        """(B,) long on ``device``: the tokens each row may still append, 0 once finished.

        Strategies that keep several fed tokens per call cap each row's kept count at this,
        so a row's cache never holds more than [audio][BOS] + its limit - 1 tokens and the
        padding calls it is fed once finished stay inside the ``lookahead`` room reserved
        beyond the limit."""
        left = [0 if done else m - len(t) for m, t, done in zip(
            self.max_tokens, self.tokens, self.finished, strict=True)]  # fmt: skip
        return torch.tensor(left, dtype=torch.long, device=device)

    def live_mask(self, device: torch.device | str) -> torch.Tensor:
        """(B,) bool on ``device``: True for the sequences that still need decoder calls."""
        return torch.tensor([not done for done in self.finished], device=device)

    def charge(self, sequences: Sequence[int], calls: int, seconds: Sequence[float]) -> None:
        """Book ``calls`` decoder calls and a share of wall time to each of ``sequences``."""
        for b, secs in zip(sequences, seconds, strict=True):
            self.calls[b] += calls
            self.decoder_seconds[b] += secs


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


def decode(
    model: DecoderModel,
    strategy: Strategy,
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    durations: Sequence[float],
    eos_id: int,
    pad_id: int,
    max_seq_len: int,
) -> list[Decoded]:
    """Decode a batch of audio embeddings with ``strategy``.

    audio (B, S, d_model) audio embeddings, audio_lens (B,), ``durations`` in seconds (they set
    each sequence's length limit). ``max_seq_len`` is the decoder context; a sequence whose
    audio alone fills it raises ``SequenceTooLongError`` (callers check lengths beforehand).
    The prefill's time is split by audio length, each later call's time evenly over the
    sequences it served.
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
        live = state.live
        calls0 = model.decoder_calls
        t0 = time.perf_counter()
        strategy.advance(model, cache, state)
        elapsed = time.perf_counter() - t0
        calls = model.decoder_calls - calls0
        if calls == 0 and state.live == live:
            raise RuntimeError(f"strategy {strategy.name!r} made no progress")
        state.charge(live, calls, [elapsed / len(live)] * len(live))

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
