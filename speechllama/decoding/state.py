"""Per-row bookkeeping of one decoding batch: accepted tokens, limits, calls and time, what a
strategy carries between calls, and dropping finished rows (batch compaction) without losing
their results or their order. Also the repetition guard every strategy shares (``looping``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOOP_PERIOD = 32
"""Longest repeated block (in tokens) the repetition guard looks for."""


def loop_copies(period: int) -> int:
    """Back-to-back copies of a ``period``-token block that count as a loop: 30 of one token,
    15 of two, 10 of three, ..., and at least 5 of any block. Conservative on purpose: speech
    repeats words ("no no no no") but not 30 times, nor a phrase five times running, while a
    decoder stuck in a loop repeats until its length limit."""
    return max(5, math.ceil(30 / period))


_SPANS = tuple(n * loop_copies(n) for n in range(1, MAX_LOOP_PERIOD + 1))


def looping(tokens: Sequence[int], max_period: int = MAX_LOOP_PERIOD) -> int:
    """The period of the loop ``tokens`` ends in (its last block of n tokens repeated
    ``loop_copies(n)`` times back to back, n <= ``max_period``), or 0 when it does not.

    Checked after every accepted token, so it is cheap when there is no loop (2.6 us on a
    200-token transcript here): a period n is compared in full only when the last token equals the
    one n places earlier."""
    size = len(tokens)
    if size < _SPANS[0]:
        return 0
    last = tokens[-1]
    periods = min(max_period, MAX_LOOP_PERIOD, size - 1)
    if last not in tokens[size - 1 - periods : size - 1]:
        return 0
    for n in range(1, periods + 1):
        span = _SPANS[n - 1]
        if span > size or tokens[size - 1 - n] != last:
            continue
        tail = tokens[size - span :]
        if tail[n:] == tail[:-n]:
            return n
    return 0


@dataclass
class DecodingState:
    """Mutable per-sequence bookkeeping for the rows of one batch (B of them right now).

    ``tokens[b]`` holds the accepted transcript tokens of row b (no BOS, no EOS);
    ``max_tokens[b]`` is its hard length limit; ``looped[b]`` the period of the repetition
    loop that ended it (0: none; see ``looping``); ``origin[b]`` is the row's index in the batch
    the loop started with. What a strategy carries from one call to the next lives here, so
    that a ``Strategy`` instance keeps no per-batch state and can be reused across batches:
    ``scratch`` for per-row values (tensors with the batch as their first dimension, or lists
    of B items, e.g. pending proposals), ``shared`` for batch-wide ones (e.g. the tree shape).

    :meth:`compact` drops rows (the loop drops finished ones, with their cache rows, so that
    later calls are narrower); :meth:`restore` brings every row back, in the original order.
    """

    eos_id: int
    pad_id: int
    max_tokens: list[int]
    tokens: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    histogram: list[list[int]] = field(default_factory=list)
    decoder_seconds: list[float] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)
    looped: list[int] = field(default_factory=list)
    max_loop_period: int = MAX_LOOP_PERIOD
    scratch: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    retired: list[tuple[Any, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.max_tokens)
        self.tokens = [[] for _ in range(n)]
        self.finished = [limit <= 0 for limit in self.max_tokens]
        self.calls = [0] * n
        self.histogram = [[] for _ in range(n)]
        self.decoder_seconds = [0.0] * n
        self.origin = list(range(n))
        self.looped = [0] * n

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
        """Append ``proposed`` tokens to sequence b, stopping at EOS, at the length limit or
        when the tokens end in a repetition loop (``looping``; ``max_loop_period = 0`` turns
        the guard off). The tokens of the loop are kept: the guard only stops it early.

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
            period = looping(self.tokens[b], self.max_loop_period) if self.max_loop_period else 0
            if period:
                self.looped[b] = period
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

    def compact(self, keep: Sequence[int]) -> None:
        """Keep rows ``keep`` (current indices, in the order they are to have), set the others
        aside until :meth:`restore`. Every ``scratch`` value is cut to the kept rows; whatever
        is not per row belongs in ``shared``. The caller moves the cache rows to match
        (``cache.reorder``)."""
        keep = list(keep)
        kept = set(keep)
        self.retired += [self._row(b) for b in range(self.batch_size) if b not in kept]
        for name in _ROW_FIELDS:
            column = getattr(self, name)
            setattr(self, name, [column[b] for b in keep])
        index: dict[torch.device, torch.Tensor] = {}
        for key, value in self.scratch.items():
            if isinstance(value, torch.Tensor):
                if value.device not in index:
                    index[value.device] = torch.tensor(keep, dtype=torch.long, device=value.device)
                self.scratch[key] = value.index_select(0, index[value.device])
            elif isinstance(value, list):
                self.scratch[key] = [value[b] for b in keep]
            else:
                raise TypeError(
                    f"scratch[{key!r}] is a {type(value).__name__}, not a per-row tensor or "
                    "list: batch-wide values belong in DecodingState.shared"
                )

    def restore(self) -> None:
        """Bring back the rows :meth:`compact` set aside: every per-row list in the original
        batch order again (``scratch`` is emptied: its dropped rows are gone)."""
        if not self.retired:
            return
        rows = sorted([self._row(b) for b in range(self.batch_size)] + self.retired)
        for i, name in enumerate(_ROW_FIELDS):
            setattr(self, name, [row[i] for row in rows])
        self.retired = []
        self.scratch = {}

    def finished_rows(self) -> list[dict[str, Any]]:
        """Every finished row, in the batch or set aside by :meth:`compact`, as
        {field: value} with ``origin`` its index in the original batch: what a caller that
        answers each sequence as soon as it ends (the server) reads between decoder calls."""
        rows = [dict(zip(_ROW_FIELDS, row, strict=True)) for row in self.retired]
        rows += [dict(zip(_ROW_FIELDS, self._row(b), strict=True)) for b in range(self.batch_size)]
        return [row for row in rows if row["finished"]]

    def _row(self, b: int) -> tuple[Any, ...]:
        return tuple(getattr(self, name)[b] for name in _ROW_FIELDS)


# Per-row fields, ``origin`` first so that sorting rows restores the original order.
_ROW_FIELDS = ("origin", "max_tokens", "tokens", "finished", "calls", "histogram",
               "decoder_seconds", "looped")  # fmt: skip
