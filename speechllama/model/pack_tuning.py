"""Measure, once per call size, whether a model's decoder calls are faster on packed weights.

Why measure a whole call rather than each matrix alone: in a real call the matrices follow each
other, the threads wake (or spin) between them and the weights compete for the caches; a loop
over one hot matrix misses all three. A scratch call of the same size (decoder and every head,
one sequence of ``bucket`` new tokens after 64 cached ones, fewer where the context is short)
is timed both ways, alternating, and the faster wins; MKL (``F.linear``, the modules' own bits)
keeps ties within 5%. It costs a few calls per size, paid the first time that size comes;
``SpeechLLaMA.tune_packing`` pays it up front, as ``bench`` and ``serve`` do.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from speechllama.model.packed import MEASURED_ROWS, row_bucket

if TYPE_CHECKING:
    from speechllama.model.speechllama import SpeechLLaMA

HISTORY = 64  # cached positions a scratch call attends over
ROUNDS = 3  # alternating timed rounds per choice; the fastest round counts
ROUND_SECONDS = 0.01  # calls per round: enough to fill this, at least one
PACKED_MARGIN = 0.95  # packed must be this much faster than MKL to be chosen


def call_sizes(batch_size: int, lookahead: int) -> list[int]:
    """Every measured call size (rows, bucketed) that decoding batches of up to ``batch_size``
    with a strategy of this ``lookahead`` can make: what to pass to
    ``SpeechLLaMA.tune_packing`` before timing or serving anything."""
    top = min(batch_size * lookahead, MEASURED_ROWS)
    return sorted({row_bucket(n) for n in range(1, top + 1)})


def _scratch_call(model: SpeechLLaMA, rows: int, dtype: torch.dtype):
    """A closure making one decoder call of ``rows`` new tokens on a scratch cache."""
    decoder = model.decoder
    device = decoder.embed.weight.device
    history = min(HISTORY, decoder.cfg.max_seq_len // 4)  # a short-context model still fits
    rows = min(rows, decoder.cfg.max_seq_len - history)
    cache = model.new_cache(1, history + rows, dtype=dtype)
    cache.lengths = torch.tensor([history], device=device)
    tokens = torch.randint(0, decoder.cfg.vocab_size, (1, rows), device=device)
    x = decoder.embed(tokens).to(dtype)
    slots = history + torch.arange(rows, device=device)[None]

    def call() -> None:
        hidden = decoder.forward_cached(x, cache, slots)
        model.heads(hidden, None, None, cache, slots)

    return call


def _round(call, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - t0) / n


@torch.no_grad()
def measure_packing(model: SpeechLLaMA, rows: int) -> bool:
    """Time a call of ``rows`` rows' bucket with and without packed weights, record the choice
    in ``model.pack_policy.choices`` and return it (True: packed)."""
    policy = model.pack_policy
    dtype = model.decoder.embed.weight.dtype
    key = policy.key(rows, dtype)
    call = _scratch_call(model, row_bucket(rows), dtype)
    best: dict[bool, float] = {}
    n = 1
    for r in range(ROUNDS):
        for choice in (False, True):
            policy.choices[key] = choice
            if r == 0:
                call()  # first use: packs the weights, warms the caches
                if not choice:
                    n = max(1, int(ROUND_SECONDS / max(_round(call, 1), 1e-6)))
            best[choice] = min(best.get(choice, float("inf")), _round(call, n))
    policy.choices[key] = best[True] < PACKED_MARGIN * best[False]
    return policy.choices[key]
