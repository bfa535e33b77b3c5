"""Runaway decoding: every strategy stops on a model forced to loop, the repetition guard ends
a loop as soon as it is confirmed (the same token for every strategy that keeps the greedy
output), the length limit follows the audio duration, and ordinary repetition in speech does
not trip the guard."""

from __future__ import annotations

import pytest
import torch
from helpers import EOS, VOCAB, D, decoding_model, run_decoding
from hypothesis import assume, given
from hypothesis import strategies as st

from speechllama.decoding import DecodingOptions, available_strategies
from speechllama.decoding import state as state_module
from speechllama.decoding.base import max_tokens_for
from speechllama.decoding.state import DecodingState, loop_copies, looping

torch.set_num_threads(1)

GUARDED = ("greedy", "threshold", "verify", "tree")  # they accept through DecodingState.accept


def force_cycle(model, monkeypatch: pytest.MonkeyPatch, cycle: list[int]) -> None:
    """Make every head of ``model`` certain of the next tokens of ``cycle`` (after BOS or any
    token outside it: its first token): a decoder stuck in a loop, whatever it is fed. The real
    calls still run, so the cache and the call counter behave as in real decoding."""
    nxt = torch.full((VOCAB,), cycle[0], dtype=torch.long)
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        nxt[a] = b

    def certain(fed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        logits = torch.full(shape, -20.0)
        ids = fed
        for h in range(shape[2]):
            ids = nxt[ids]
            logits[:, :, h].scatter_(-1, ids[..., None], 20.0)
        return logits

    real_prefill, real_step = model.prefill, model.step

    def prefill(audio, audio_lens, cache, num_heads=None):
        out = real_prefill(audio, audio_lens, cache, num_heads=num_heads)
        return certain(torch.full(out.shape[:2], 1), out.shape)  # fed BOS

    def step(tokens, cache, tree_mask=None, num_heads=None):
        out = real_step(tokens, cache, tree_mask, num_heads)
        return certain(tokens, out.shape)

    monkeypatch.setattr(model, "prefill", prefill)
    monkeypatch.setattr(model, "step", step)


def _decode(model, strategy: str, seconds: list[float]):
    audio = torch.randn(len(seconds), 3, D, generator=torch.Generator().manual_seed(0))
    lens = torch.full((len(seconds),), 3)
    return run_decoding(
        model, audio, lens, seconds, strategy=strategy, num_heads=3, batch_size=len(seconds)
    )


@pytest.mark.parametrize("cycle", [[7], [7, 9], [5, 6, 7, 8, 9, 10, 11]])
@pytest.mark.parametrize("strategy", available_strategies())
def test_every_strategy_stops_on_a_model_forced_to_loop(
    monkeypatch: pytest.MonkeyPatch, strategy: str, cycle: list[int]
) -> None:
    model = decoding_model("projection", 3, max_seq_len=512).eval()
    force_cycle(model, monkeypatch, cycle)
    seconds = [30.0, 20.0]  # limits of 376 and 256 tokens: far beyond any loop
    out = _decode(model, strategy, seconds)
    period = len(cycle)
    expected = [(cycle * 60)[: period * loop_copies(period)]] * 2
    for d, secs in zip(out, seconds, strict=True):
        assert len(d.tokens) <= max_tokens_for(secs, DecodingOptions())
        assert EOS not in d.tokens
    if strategy in GUARDED:  # stopped by the guard the moment the loop is confirmed
        assert [list(d.tokens) for d in out] == expected
        assert sum(i * n for i, n in enumerate(out[0].accepted_per_call)) == len(out[0].tokens)


@pytest.mark.parametrize("strategy", GUARDED)
def test_without_the_guard_the_duration_limit_stops_the_loop(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    model = decoding_model("projection", 3, max_seq_len=512).eval()
    force_cycle(model, monkeypatch, [7, 9])
    monkeypatch.setattr(state_module, "looping", lambda tokens, max_period=0: 0)
    seconds = [0.5, 4.0, 9.0]
    out = _decode(model, strategy, seconds)
    assert [len(d.tokens) for d in out] == [max_tokens_for(s, DecodingOptions()) for s in seconds]
    assert [len(d.tokens) for d in out] == [22, 64, 124]


def test_guard_thresholds_and_the_row_records_the_period() -> None:
    assert [loop_copies(n) for n in (1, 2, 3, 4, 6, 7, 32)] == [30, 15, 10, 8, 5, 5, 5]
    assert looping([4] * 29) == 0 and looping([4] * 30) == 1
    assert looping([3, 4] * 14 + [3]) == 0 and looping([3, 4] * 15) == 2
    assert looping([1, 2, 3, 4, 5, 6, 7] * 4 + [1, 2, 3, 4, 5, 6]) == 0
    assert looping([9, 9] + [1, 2, 3, 4, 5, 6, 7] * 5) == 7
    assert looping(list(range(33)) * 6) == 0  # longer than the longest period looked for
    state = DecodingState(eos_id=EOS, pad_id=0, max_tokens=[500, 500])
    assert state.accept(0, [5] * 40) == 30 and state.finished[0] and state.looped[0] == 1
    assert state.accept(1, [5, 6] * 10) == 20 and not state.finished[1]
    off = DecodingState(eos_id=EOS, pad_id=0, max_tokens=[50], max_loop_period=0)
    assert off.accept(0, [5] * 60) == 50 and off.looped == [0]


@given(
    block=st.lists(st.integers(3, 500), min_size=1, max_size=32, unique=True),
    prefix=st.lists(st.integers(3, 500), max_size=20),
)
def test_a_loop_is_found_exactly_when_its_last_copy_completes(
    block: list[int], prefix: list[int]
) -> None:
    # A prefix ending in the block's last token is one more copy's tail: the loop would then be
    # complete one token earlier (hypothesis found prefix=[3], block=[3]).
    assume(not prefix or prefix[-1] != block[-1])
    n = len(block)
    loop = prefix + block * loop_copies(n)
    assert looping(loop) == n  # distinct tokens: no shorter period fits
    assert looping(loop[:-1]) == 0 or looping(loop[:-1]) < n


@pytest.mark.parametrize(
    "words",
    [
        "no " * 12,  # emphatic repetition, far more than speech has
        "ha " * 20,
        "very " * 8 + "good",
        "one two three four " * 4,
        "the cat and the dog and the bird and the fish and the cow and the hen " * 2,
    ],
)
def test_speech_like_repetition_does_not_trip_the_guard(words: str) -> None:
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(w, len(vocab) + 3) for w in words.split()]  # a token per word
    assert not any(looping(ids[: i + 1]) for i in range(len(ids)))
