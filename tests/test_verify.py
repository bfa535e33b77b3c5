"""Verification-based decoding: ``exact`` is greedy token for token (batched and unbatched, on
models trained so that proposals are sometimes kept and sometimes rejected), rolled-back cache
slots are never seen again, and the batched cached strategy equals an uncached one-sequence
reference in both ``exact`` and ``topk`` modes, calls and histograms included."""

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

from speechllama.decoding import DecodingOptions, get_strategy
from speechllama.decoding.base import Decoded, fast_argmax, max_tokens_for
from speechllama.model.kv_cache import KVCache
from speechllama.model.speechllama import SpeechLLaMA

torch.set_num_threads(1)
K, S, U = 4, 6, 20
MAX_LEN = 128
# Rows 0-3 replay training audio (long accepted blocks, EOS inside a block), rows 4-7 perturbed
# audio (more rejections). A duration of 0.1 s caps a row at 16 + ceil(1.2) = 18 tokens, one
# short of a training transcript (U - 1 = 19), so the limit cuts it inside an accepted block.
DURATIONS = [1.0, 0.1, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0]
LENS = [6, 6, 4, 6, 5, 6, 6, 3]


def _sequences(n: int, g: torch.Generator) -> torch.Tensor:
    """n label rows y_1..y_{U-1} EOS: walks that step +1..+3 (mod the vocabulary), so the heads
    can learn part of what lies ahead but not all of it."""
    rows = torch.empty(n, U, dtype=torch.long)
    for i in range(n):
        t = int(torch.randint(3, VOCAB, (1,), generator=g))
        for u in range(U - 1):
            rows[i, u] = t
            t = 3 + (t - 3 + int(torch.randint(1, 4, (1,), generator=g))) % (VOCAB - 3)
        rows[i, U - 1] = EOS
    return rows


@functools.cache
def trained(kind: str, steps: int = 150) -> tuple[SpeechLLaMA, torch.Tensor, torch.Tensor]:
    """A K-head model fitted for ``steps`` Adam steps to 8 sequences with fixed random audio
    embeddings; returns it (eval, fp32) with decode audio (8, S, D) and lens (8,)."""
    model = decoding_model(kind, K, MAX_LEN)
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(8, S, D, generator=g)
    labels = _sequences(8, g)
    fit(model, audio, torch.full((8,), S), labels, steps)
    return model, held_out(audio, 4, LENS, g), torch.tensor(LENS)


@pytest.fixture(scope="module", params=["latent", "layer"])
def fitted(request: pytest.FixtureRequest) -> tuple[SpeechLLaMA, torch.Tensor, torch.Tensor]:
    return trained(request.param)


def run(
    model: SpeechLLaMA, audio, lens, durations=DURATIONS, compact=True, **opts
) -> list[Decoded]:
    return run_decoding(model, audio, lens, durations, compact, **opts)


def _greedy_margins(model: SpeechLLaMA, audio, lens, monkeypatch) -> float:
    """The smallest gap between head 1's two best logits over every greedy call: exactness in
    fp32 rests on it being far above the ~1e-7 by which a k-token call's logits differ from a
    1-token call's."""
    gaps: list[float] = []
    real_step = model.step

    def spy(tokens, cache, tree_mask=None, num_heads=None):
        logits = real_step(tokens, cache, tree_mask, num_heads)
        top = logits[:, :, 0].topk(2, dim=-1).values
        gaps.append(float((top[..., 0] - top[..., 1]).min()))
        return logits

    monkeypatch.setattr(model, "step", spy)
    run(model, audio, lens, strategy="greedy")
    monkeypatch.undo()
    return min(gaps)


def _block_stats(out: list[Decoded], n: int) -> tuple[int, int]:
    """(calls that kept more than one token, calls that rejected a proposal) over all rows,
    not counting each row's prefill and last call (which EOS or the length limit may cut)."""
    multi = rejected = 0
    for d in out:
        hist = list(d.accepted_per_call) + [0] * (n + 1 - len(d.accepted_per_call))
        if d.tokens:
            hist[1] -= 1  # the prefill kept one token
        multi += sum(hist[2:]) - 1
        rejected += sum(hist[:n]) - 1
    return multi, rejected


def _check_histogram(out: list[Decoded]) -> None:
    for d in out:
        hist = d.accepted_per_call
        assert sum(i * c for i, c in enumerate(hist)) == len(d.tokens)
        assert sum(hist) == d.decoder_calls


@pytest.mark.parametrize("heads", [None, 2])
def test_exact_equals_greedy_batched_and_unbatched(fitted, heads, monkeypatch):
    model, audio, lens = fitted
    n = heads or K
    assert _greedy_margins(model, audio, lens, monkeypatch) > 1e-3
    greedy = run(model, audio, lens, strategy="greedy")
    out = run(model, audio, lens, strategy="verify", verify="exact", num_heads=heads)
    assert [d.tokens for d in out] == [d.tokens for d in greedy]
    _check_histogram(out)
    # not vacuous: EOS and the limit both end rows, blocks are kept and proposals rejected
    limits = [max_tokens_for(d, DecodingOptions()) for d in DURATIONS]
    ends = {"limit" if len(d.tokens) == m else "eos" for d, m in zip(out, limits, strict=True)}
    assert ends == {"limit", "eos"}
    multi, rejected = _block_stats(out, n)
    assert multi >= 5 and rejected >= 5, (multi, rejected)
    assert sum(d.decoder_calls for d in out) < sum(d.decoder_calls for d in greedy)
    for b, m in enumerate(LENS):
        alone = run(model, audio[b : b + 1, :m], lens[b : b + 1], DURATIONS[b : b + 1],
                    strategy="verify", num_heads=heads)  # fmt: skip
        assert alone[0].tokens == out[b].tokens
        assert alone[0].decoder_calls == out[b].decoder_calls
        assert alone[0].accepted_per_call == out[b].accepted_per_call


def test_rollback_leaves_nothing_visible(fitted, monkeypatch):
    """Every rolled-back slot is overwritten with large garbage as soon as it is released: if
    any later call saw one, its logits (and so the transcript) would change. The kept length
    is also checked at every call: slot ``lengths[b]`` receives the last kept token."""
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    real_truncate = KVCache.truncate
    g = torch.Generator().manual_seed(7)
    poisoned = [0]

    def truncate_and_poison(self: KVCache, new_lengths) -> None:
        real_truncate(self, new_lengths)
        stale = torch.arange(self.max_len)[None, :] >= self.lengths[:, None]  # (B, max_len)
        where = stale[None, :, None, :, None].expand_as(self.k)
        noise = 100 * torch.randn(self.k.shape, generator=g)
        self.k.copy_(torch.where(where, noise, self.k))
        self.v.copy_(torch.where(where, -noise, self.v))
        poisoned[0] += 1

    monkeypatch.setattr(KVCache, "truncate", truncate_and_poison)
    fed = record_steps(
        model,
        monkeypatch,
        lambda tokens, cache, *_: (tokens[:, 0].tolist(), cache.lengths.tolist()),
    )
    out = run(model, audio, lens, strategy="verify", compact=False)  # rows keep their index
    assert poisoned[0] == len(fed) > 0
    assert [d.tokens for d in out] == [d.tokens for d in greedy]
    for b, d in enumerate(out):
        live_calls = d.decoder_calls - 1  # after the prefill
        for first, lengths in fed[:live_calls]:
            kept = lengths[b] - LENS[b]  # cache = [audio][BOS] y_1 .. y_{kept - 1}
            assert first[b] == d.tokens[kept - 1]
        after = fed[live_calls:]  # finished: fed padding only, never grows
        assert all(first[b] == PAD for first, _ in after)
        assert len({lengths[b] for _, lengths in after}) <= 1


def _reference(model, audio, n, duration, mode, topk, heads) -> tuple[list[int], int, list[int]]:
    """One sequence, no cache: every call recomputes the teacher-forced forward over
    [BOS] y_1..y_t p_1..p_{h-1} and applies the verify rule. Returns tokens, calls, histogram."""
    limit = max_tokens_for(duration, DecodingOptions())

    def forward(seq: list[int]) -> torch.Tensor:  # (len(seq) + 1, heads, V)
        ids = torch.tensor([[BOS, *seq]])
        with torch.inference_mode():
            logits = model(audio[None, :n], torch.tensor([n]), ids, torch.tensor([len(seq) + 1]))
        return logits[0, :, :heads]

    out: list[int] = []
    hist = [0] * (heads + 1)
    done = False

    def emit(block: list[int]) -> None:
        nonlocal done
        added = 0
        for tok in block:
            if tok == EOS:
                done = True
                break
            out.append(tok)
            added += 1
            if len(out) >= limit:
                done = True
                break
        hist[added] += 1

    first = forward([])[0].argmax(-1).tolist()
    emit(first[:1])
    proposals, calls = first[1:], 1
    while not done:
        logits = forward(out + proposals)[len(out) :]  # fed positions: y_t, p_1 .. p_{h-1}
        calls += 1
        own = logits[:, 0].argmax(-1).tolist()
        a = 0
        for j, p in enumerate(proposals):
            beaten_by = int((logits[j, 0] > logits[j, 0, p]).sum())  # rank of p at j
            ok = p == own[j] if mode == "exact" else beaten_by < topk
            if not ok:
                break
            a += 1
        emit([*proposals[:a], own[a]])
        proposals = logits[a, 1:].argmax(-1).tolist()
    while hist and hist[-1] == 0:
        hist.pop()
    return out, calls, hist


@pytest.mark.parametrize("mode,topk", [("exact", 1), ("topk", 3)])
def test_batched_cached_equals_uncached_reference(mode, topk):
    model, audio, lens = trained("projection")
    heads = 3
    out = run(model, audio, lens, strategy="verify", verify=mode, topk=topk, num_heads=heads)
    for b, n in enumerate(LENS):
        tokens, calls, hist = _reference(model, audio[b], n, DURATIONS[b], mode, topk, heads)
        assert list(out[b].tokens) == tokens, b
        assert out[b].decoder_calls == calls
        assert list(out[b].accepted_per_call) == hist
    if mode == "topk":  # lossy: it keeps more than exact does, and so needs fewer calls
        exact = run(model, audio, lens, strategy="verify", num_heads=heads)
        assert sum(d.decoder_calls for d in out) < sum(d.decoder_calls for d in exact)


def test_topk_one_is_exact(fitted):
    model, audio, lens = fitted
    exact = run(model, audio, lens, strategy="verify", verify="exact")
    top1 = run(model, audio, lens, strategy="verify", verify="topk", topk=1)
    assert summary(top1) == summary(exact)


def test_bad_options_are_clear_errors(fitted):
    with pytest.raises(ValueError, match="verify mode 'fuzzy'"):
        get_strategy(DecodingOptions(strategy="verify", verify="fuzzy"))
    with pytest.raises(ValueError, match="topk >= 1"):
        get_strategy(DecodingOptions(strategy="verify", verify="topk", topk=0))
    model, audio, lens = fitted
    with pytest.raises(ValueError, match="num_heads=5, but the model has 4 heads"):
        run(model, audio, lens, strategy="verify", num_heads=5)


def test_fast_argmax_is_argmax_first_of_ties():
    g = torch.Generator().manual_seed(3)
    for shape in [(8, 4, 4, 1024), (4, 3, 4096), (5, 640), (2, 4, 4, 1000), (3, 128)]:
        x = torch.randn(shape, generator=g)
        assert torch.equal(fast_argmax(x), x.argmax(dim=-1))
        # ties: the maximum repeated within and across chunks, and rows of equal values
        y = (x * 2).round() / 2
        flat = y.view(-1, y.shape[-1])
        flat[0] = 7.0
        flat[-1, [3, 64, 200 % y.shape[-1]]] = 99.0
        flat[1 % flat.shape[0]] = -torch.inf
        assert torch.equal(fast_argmax(y), y.argmax(dim=-1))


@pytest.mark.parametrize("kind", ["projection", "latent", "layer"])
@pytest.mark.parametrize("heads", [3, 4])
@pytest.mark.parametrize("eos", [EOS, -1])
def test_rows_at_their_limit_stay_inside_the_cache(kind, heads, eos, monkeypatch):
    """Regression: with ``num_heads`` set, the cache room reserved per row is n; a row that hit
    its length limit inside an accepted block used to keep the whole block in its cache, and
    the padding calls it is fed until the batch ends then wrote past the cache ("writing slot
    30 ... exceeds the cache (max_len=29)"). Every row now holds at most [audio][BOS] + its
    limit - 1 tokens before every call, so any n-token call fits its reserved room."""
    model, audio, lens = trained(kind)
    durations = [0.1] * len(LENS)  # every row's limit (18) cuts a 19-token transcript
    limits = [max_tokens_for(d, DecodingOptions()) for d in durations]

    def verify(audio, lens, durations) -> list[Decoded]:
        # finished rows stay (worst case) and keep their index
        return run(model, audio, lens, durations, compact=False, eos_id=eos, strategy="verify",
                   num_heads=heads)  # fmt: skip

    over = cache_overruns(model, monkeypatch, LENS, limits)
    out = verify(audio, lens, durations)
    assert max(max(row) for row in over) <= 0, over
    if eos == -1:  # no EOS: every row runs to its limit, some finish calls before others
        assert [len(d.tokens) for d in out] == limits
        assert len({d.decoder_calls for d in out}) > 1
    monkeypatch.undo()
    for b, m in enumerate(LENS):  # and the cut changes nothing about what a row emits
        alone = verify(audio[b : b + 1, :m], lens[b : b + 1], durations[b : b + 1])[0]
        assert (alone.tokens, alone.decoder_calls) == (out[b].tokens, out[b].decoder_calls)


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_compaction_changes_no_result(fitted, mode, monkeypatch):
    """Dropping finished rows (cache rows, ``layer`` heads' cache layers and the pending
    proposals with them) leaves every row's tokens, calls and histogram as they were."""
    model, audio, lens = fitted
    opts = {"strategy": "verify", "verify": mode, "topk": 2}
    full = run(model, audio, lens, compact=False, **opts)
    widths = record_steps(model, monkeypatch, lambda tokens, *_: tokens.shape[0])
    compacted = run(model, audio, lens, **opts)
    assert summary(compacted) == summary(full)
    assert widths[0] == len(LENS) and widths[-1] < len(LENS)
