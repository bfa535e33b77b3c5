"""``draft_threshold="auto"``: pick the confidence gate from what a wider call costs here.

Why a measured gate: feeding one more proposal pays off when the tokens it is expected to add
outweigh what it adds to the call's time. A proposal whose chained confidence is q adds about q
tokens; it widens the call by one token, which costs ``slope`` = (c(K) - c(1)) / ((K - 1) c(1))
of a one-token call (c(w): the time of a call that feeds w tokens per sequence). A one-token
call yields one token, so the break-even confidence is about ``slope``: the gate this module
sets. On a GPU a call of 4 tokens costs what a call of 1 does, the slope is near 0 and every
proposal is fed (the paper's fixed width); on a 2-core CPU (session 15: c(4)/c(1) about 1.46,
slope 0.15) unlikely proposals are held back. Measured sweeps put the best fixed P at 0.1 there.

What is timed: ``model.step`` itself (compiled calls, packed weights, the model's dtype) on a
scratch cache of ``batch_size`` sequences with 64 cached positions, widths 1 and K, the median
ratio of nine rounds (see ``call_costs``), after the packed-weight choice of both sizes is made
and a round of each has warmed up. Once per (model, batch size, heads, threads, compiled or
not): under 1 s on the CPU, and the model's decoder-call count is left as it was. Repeated in
fresh processes on this VM it gave P = 0.08-0.16 at batch 1 and 0.16-0.21 at batch 8.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import weakref
from typing import Any

import torch

from speechllama.decoding.options import DecodingOptions

AUTO = "auto"
HISTORY = 64  # cached positions the timed calls attend over
ROUNDS = 9  # timed rounds, each of every width back to back; the median ratio counts
ROUND_SECONDS = 0.03  # calls per width and round: enough to fill this, at least one
MAX_AUTO = 0.5  # a gate above this would feed almost nothing: cap the measured slope here

_CHOSEN: weakref.WeakKeyDictionary[Any, dict[tuple, float]] = weakref.WeakKeyDictionary()


def is_auto(options: DecodingOptions) -> bool:
    return isinstance(options.draft_threshold, str)


def resolve(options: DecodingOptions, model: Any) -> DecodingOptions:
    """``options`` with an ``"auto"`` draft threshold replaced by :func:`auto_threshold`'s value
    for ``model`` (a SpeechLLaMA); other options come back unchanged."""
    if not is_auto(options):
        return options
    if options.draft_threshold != AUTO:
        raise ValueError(
            f"draft threshold must be a number or 'auto', got {options.draft_threshold!r}"
        )
    heads = options.num_heads or model.config.heads.num_heads
    p = auto_threshold(model, options.batch_size, heads)
    return dataclasses.replace(options, draft_threshold=p)


def auto_threshold(model: Any, batch_size: int, num_heads: int) -> float:
    """The gate for ``model`` at this batch size and K: the measured slope, in [0, MAX_AUTO];
    0 for a one-head model (nothing to gate)."""
    if num_heads < 2:
        return 0.0
    key = (batch_size, num_heads, torch.get_num_threads(), model.compiled is not None)
    chosen = _CHOSEN.setdefault(model, {})
    if key not in chosen:
        costs = call_costs(model, batch_size, num_heads, (1, num_heads))
        chosen[key] = threshold_from_costs(costs[1], costs[num_heads], num_heads)
    return chosen[key]


def threshold_from_costs(one: float, wide: float, width: int) -> float:
    """``slope`` = (c(w) - c(1)) / ((w - 1) c(1)), clamped to [0, MAX_AUTO]."""
    slope = (wide - one) / ((width - 1) * one)
    return float(min(max(slope, 0.0), MAX_AUTO))


@torch.no_grad()
def call_costs(
    model: Any, batch_size: int, num_heads: int, widths: tuple[int, ...]
) -> dict[int, float]:
    """Seconds per ``model.step`` call feeding w tokens to each of ``batch_size`` sequences,
    for each w in ``widths``, relative to the first width's: each round times every width back
    to back and the median over rounds of each time / the first width's time is kept, times
    the first width's median. Why ratios: this 2-core VM's speed drifts by tens of percent
    between rounds, and a slow round slows all widths alike, so it cancels in a ratio where
    separate minima would not."""
    calls = model.decoder_calls
    history = min(HISTORY, model.config.decoder.max_seq_len // 4)
    cache = model.new_cache(batch_size, history + max(widths))
    device = cache.lengths.device
    start = torch.full((batch_size,), history, dtype=cache.lengths.dtype, device=device)
    vocab = model.config.decoder.vocab_size
    tokens = {w: torch.randint(4, vocab, (batch_size, w), device=device) for w in widths}

    def run(w: int, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            cache.lengths = start.clone()
            model.step(tokens[w], cache, num_heads=num_heads)
        return (time.perf_counter() - t0) / n

    if hasattr(model, "tune_packing"):  # the kernel choice first, or a first call measures it
        model.tune_packing([batch_size * w for w in widths])
    try:
        for w in widths:
            run(w, 1)  # first use: compiles, packs weights
        n = max(1, int(ROUND_SECONDS / max(run(widths[0], 1), 1e-6)))
        for w in widths:
            run(w, n)  # a round each unmeasured: threads awake, weights in the caches
        rounds = [{w: run(w, n) for w in widths} for _ in range(ROUNDS)]
    finally:
        model.decoder_calls = calls  # measuring is not decoding
    first = statistics.median(r[widths[0]] for r in rounds)
    return {w: first * statistics.median(r[w] / r[widths[0]] for r in rounds) for w in widths}
