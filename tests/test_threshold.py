"""Threshold-based decoding: above 1 it is greedy call for call; otherwise the batched cached
strategy (rows feeding different numbers of tokens in one call) equals an uncached
one-sequence reference of the rule, calls and accepted-per-call histograms included."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    BOS,
    EOS,
    PAD,
    VOCAB,
    D,
    cache_overruns,
    decoding_model,
    fit,
    held_out,
    record_steps,
    run_decoding,
    summary,
)

from speechllama.decoding import DecodingOptions
from speechllama.decoding.base import Decoded, max_tokens_for
from speechllama.model.speechllama import SpeechLLaMA

torch.set_num_threads(1)
K, S, U = 4, 6, 20
MAX_LEN = 128
DURATIONS = [1.0, 0.1, 1.0, 1.0, 1.0, 0.1]  # 0.1 s: a limit of 18 tokens cuts a block
LENS = [6, 6, 6, 4, 6, 3]  # rows 0-2: the training audio, whole


@functools.cache
def trained(kind: str) -> tuple[SpeechLLaMA, torch.Tensor, torch.Tensor]:
    """A K-head model fitted for 120 Adam steps to 6 walks (steps of +1..+3, so heads 2..K are
    sure of some tokens and unsure of others) with fixed random audio embeddings; returns it
    with decode audio: rows 0-2 the training audio, rows 3-5 perturbed."""
    model = decoding_model(kind, K, MAX_LEN)
    g = torch.Generator().manual_seed(2)
    n = len(LENS)
    start = torch.randint(0, VOCAB - 3, (n, 1), generator=g)
    walk = (start + torch.randint(1, 4, (n, U - 1), generator=g).cumsum(1)) % (VOCAB - 3) + 3
    labels = torch.cat([walk, torch.full((n, 1), EOS)], dim=1)
    audio = torch.randn(n, S, D, generator=g)
    fit(model, audio, torch.full((n,), S), labels, steps=120)
    return model, held_out(audio, 3, LENS, g), torch.tensor(LENS)


@pytest.fixture(scope="module", params=["projection", "latent"])
def fitted(request: pytest.FixtureRequest) -> tuple[SpeechLLaMA, torch.Tensor, torch.Tensor]:
    return trained(request.param)


def run(
    model: SpeechLLaMA, audio, lens, durations=DURATIONS, compact=True, **opts
) -> list[Decoded]:
    return run_decoding(model, audio, lens, durations, compact, **opts)


@pytest.mark.parametrize("threshold", [1.0001, 2.0])
@pytest.mark.parametrize("heads", [None, 2])
def test_threshold_above_one_is_greedy(fitted, threshold, heads):
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    out = run(model, audio, lens, strategy="threshold", threshold=threshold, num_heads=heads)
    assert summary(out) == summary(greedy)
    assert {len(d.accepted_per_call) for d in out} <= {1, 2}  # never more than 1 per call


def _reference(model, audio, n, duration, threshold, heads) -> tuple[list[int], int, list[int]]:
    """One sequence, no cache: every call recomputes the teacher-forced forward over
    [BOS] y_1..y_t and applies the threshold rule at the last position."""
    limit = max_tokens_for(duration, DecodingOptions())
    out: list[int] = []
    hist = [0] * (heads + 1)
    calls, done = 0, False
    while not done:
        ids = torch.tensor([[BOS, *out]])
        with torch.inference_mode():
            logits = model(audio[None, :n], torch.tensor([n]), ids, torch.tensor([len(out) + 1]))
        calls += 1
        probs = logits[0, -1, :heads].float().softmax(-1)  # (heads, V)
        p, tok = probs.max(-1)
        block = [int(tok[0])]
        for k in range(1, heads):
            if float(p[k]) < threshold:
                break
            block.append(int(tok[k]))
        added = 0
        for t in block:
            if t == EOS:
                done = True
                break
            out.append(t)
            added += 1
            if len(out) >= limit:
                done = True
                break
        hist[added] += 1
    while hist and hist[-1] == 0:
        hist.pop()
    return out, calls, hist


@pytest.mark.parametrize("threshold,heads", [(0.9, None), (0.95, 3), (0.0, None), (0.0, 2)])
def test_batched_cached_equals_uncached_reference(fitted, threshold, heads, monkeypatch):
    model, audio, lens = fitted
    n = heads or K

    def fed(tokens, cache, tree_mask, num_heads) -> list[int]:
        assert num_heads == n  # the same heads as the prefill, every call
        return (tokens != PAD).sum(1).tolist()

    widths = record_steps(model, monkeypatch, fed)  # tokens each row fed, per call
    out = run(model, audio, lens, strategy="threshold", threshold=threshold, num_heads=heads)
    monkeypatch.undo()
    for b, m in enumerate(LENS):
        tokens, calls, hist = _reference(model, audio[b], m, DURATIONS[b], threshold, n)
        assert list(out[b].tokens) == tokens, b
        assert out[b].decoder_calls == calls
        assert list(out[b].accepted_per_call) == hist
        assert sum(i * c for i, c in enumerate(hist)) == len(tokens)
    # not vacuous: calls kept several tokens, and (but at 0) some stopped at an unsure head,
    # so that rows fed different numbers of tokens in one call
    assert sum(sum(d.accepted_per_call[2:]) for d in out) >= 10
    stopped = sum(max(0, sum(d.accepted_per_call[1:n]) - 1) for d in out)  # not the last calls
    if threshold == 0.0:  # every head is kept: n tokens per call, but for a row's last call
        assert stopped == 0
        assert all(sum(d.accepted_per_call[:n]) <= 1 for d in out)
    else:
        assert stopped >= 3
        assert any(len({w for w in row if w}) > 1 for row in widths)


def test_batched_equals_unbatched(fitted):
    model, audio, lens = fitted
    out = run(model, audio, lens, strategy="threshold", threshold=0.5)
    for b, m in enumerate(LENS):
        alone = run(model, audio[b : b + 1, :m], lens[b : b + 1], DURATIONS[b : b + 1],
                    strategy="threshold", threshold=0.5)  # fmt: skip
        assert summary(alone) == summary(out[b : b + 1])


def test_fewer_calls_than_greedy_at_a_usable_threshold(fitted):
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    out = run(model, audio, lens, strategy="threshold", threshold=0.9)
    assert sum(d.decoder_calls for d in out) < sum(d.decoder_calls for d in greedy)
    # on the training audio the heads are sure and right: the transcript is greedy's
    assert [d.tokens for d in out[:3]] == [d.tokens for d in greedy[:3]]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("heads", [3, 4])
def test_rows_at_their_limit_stay_inside_the_cache(fitted, threshold, heads, monkeypatch):
    """The bug verify had (a row cut by its limit inside a kept block kept the whole block in
    its cache, and the padding calls after it overran the n slots reserved past the limit)
    cannot happen here: a row's cache holds only tokens it appended, all but the last call's.
    Checked with no EOS, so every row runs into its limit, before every call."""
    model, audio, lens = fitted
    durations = [0.1] * len(LENS)
    limits = [max_tokens_for(d, DecodingOptions()) for d in durations]
    over = cache_overruns(model, monkeypatch, LENS, limits)
    # finished rows stay (worst case) and keep their index
    out = run(model, audio, lens, durations, compact=False, eos_id=-1, strategy="threshold",
              threshold=threshold, num_heads=heads)  # fmt: skip
    assert max(max(row) for row in over) <= 0
    assert [len(d.tokens) for d in out] == limits


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_compaction_changes_no_result(fitted, threshold, monkeypatch):
    """Dropping finished rows (cache rows, pending tokens and per-row feed counts with them)
    leaves every row's tokens, calls and histogram as they were."""
    model, audio, lens = fitted
    durations = [0.0, 0.1, 0.3, 1.0, 0.0, 0.5]  # limits 16 .. 28: rows finish calls apart
    opts = {"durations": durations, "strategy": "threshold", "threshold": threshold}
    full = run(model, audio, lens, compact=False, **opts)
    widths = record_steps(model, monkeypatch, lambda tokens, *_: tokens.shape[0])
    compacted = run(model, audio, lens, **opts)
    assert summary(compacted) == summary(full)
    assert widths[0] == len(LENS) and widths[-1] < len(LENS)
