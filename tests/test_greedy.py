"""Greedy decoding: batched == unbatched token for token, == a naive full-recompute loop, and
always stops (EOS or the duration-based length limit); calls and time are charged per sequence."""

from __future__ import annotations

import pytest
import torch

from speechllama.decoding import DecodingOptions, get_strategy
from speechllama.decoding.base import Decoded, decode, max_tokens_for
from speechllama.decoding.state import DecodingState
from speechllama.model.config import HeadsConfig, preset
from speechllama.model.heads import HEADS
from speechllama.model.speechllama import SpeechLLaMA

torch.set_num_threads(1)
VOCAB = 48
NEVER = -1  # an EOS id argmax can never produce: sequences run to their length limit


@pytest.fixture(scope="module")
def model() -> SpeechLLaMA:
    torch.manual_seed(0)
    m = SpeechLLaMA(preset("tiny", VOCAB)).eval().double()
    with torch.no_grad():  # spread the logits so argmax ties (and float noise flips) are unlikely
        for p in m.parameters():
            p.mul_(3.0)
    return m


def _audio(model: SpeechLLaMA, lens: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random audio embeddings (B, max(lens), d), zero past each length, and lens (B,)."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.decoder.d_model
    x = torch.randn(len(lens), max(lens), d, generator=g, dtype=torch.float64)
    for b, n in enumerate(lens):
        x[b, n:] = 0
    return x, torch.tensor(lens)


def _greedy(model, audio, lens, durations, eos, compact=True, **opts) -> list[Decoded]:
    strategy = get_strategy(DecodingOptions(strategy="greedy", **opts))
    cfg = model.config
    with torch.inference_mode():
        return decode(
            model, strategy, audio, lens, durations, eos_id=eos, pad_id=cfg.pad_id,
            max_seq_len=cfg.decoder.max_seq_len, compact=compact,
        )  # fmt: skip


def _naive(model, audio, n, duration, eos) -> list[int]:
    """Reference: recompute the whole teacher-forced forward() for every new token (no cache)."""
    limit = max_tokens_for(duration, DecodingOptions())
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < limit:
            tokens = torch.tensor([[model.config.bos_id, *out]])
            logits = model(audio[None, :n], torch.tensor([n]), tokens, torch.tensor([len(out) + 1]))
            nxt = int(logits[0, -1, 0].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


LENS = [7, 3, 11, 5]
DURATIONS = [0.5, 0.2, 1.0, 0.1]  # limits 22, 19, 28, 18 tokens


def _eos_by_construction(model, audio, lens) -> int:
    """A token that sequence 0 emits at its 4th step: used as EOS, it stops that sequence early
    while the others (probably) run on, so the batch is ragged by construction."""
    free = _greedy(model, audio, lens, DURATIONS, NEVER)
    return free[0].tokens[3]


def test_batched_equals_unbatched_token_for_token(model):
    audio, lens = _audio(model, LENS)
    eos = _eos_by_construction(model, audio, lens)
    batched = _greedy(model, audio, lens, DURATIONS, eos)
    lengths = [len(d.tokens) for d in batched]
    limits = [max_tokens_for(d, DecodingOptions()) for d in DURATIONS]
    assert len(set(lengths)) > 1, "the test needs ragged lengths"
    assert lengths[0] <= 3  # stopped at the constructed EOS
    assert any(n == lim for n, lim in zip(lengths, limits, strict=True))  # and one by the limit
    for b, n in enumerate(LENS):
        alone = _greedy(model, audio[b : b + 1, :n], lens[b : b + 1], DURATIONS[b : b + 1], eos)
        assert alone[0].tokens == batched[b].tokens
        assert alone[0].decoder_calls == batched[b].decoder_calls
        assert alone[0].accepted_per_call == batched[b].accepted_per_call


def test_greedy_equals_naive_full_forward_loop(model):
    audio, lens = _audio(model, LENS, seed=1)
    eos = _eos_by_construction(model, audio, lens)
    batched = _greedy(model, audio, lens, DURATIONS, eos)
    for b, n in enumerate(LENS):
        assert list(batched[b].tokens) == _naive(model, audio[b], n, DURATIONS[b], eos)


def test_stops_at_duration_limit_and_counts_calls(model):
    audio, lens = _audio(model, LENS, seed=2)
    limits = {"max_tokens_per_second": 10.0, "max_tokens_min": 4}
    opts = DecodingOptions(**limits)
    calls0 = model.decoder_calls
    out = _greedy(model, audio, lens, DURATIONS, NEVER, **limits)
    assert [max_tokens_for(dur, opts) for dur in DURATIONS] == [9, 6, 14, 5]  # 4 + ceil(10 s)
    for d, dur in zip(out, DURATIONS, strict=True):
        limit = max_tokens_for(dur, opts)
        assert len(d.tokens) == limit
        # the prefill yields token 1, each later call one more; no call after the limit
        assert d.decoder_calls == limit
        assert d.accepted_per_call == (0, limit)
    # batched calls: the longest sequence needs them all, each call counted once by the model
    assert model.decoder_calls - calls0 == max(d.decoder_calls for d in out)


def test_eos_call_is_counted_with_zero_tokens(model):
    audio, lens = _audio(model, [6], seed=3)
    free = _greedy(model, audio, lens, [1.0], NEVER)
    eos = free[0].tokens[2]
    first = free[0].tokens.index(eos)  # the EOS stops at its first occurrence
    out = _greedy(model, audio, lens, [1.0], eos)[0]
    assert out.tokens == free[0].tokens[:first]
    assert out.decoder_calls == first + 1
    assert out.accepted_per_call == ((1, first) if first else (1,))


def test_finished_sequences_are_not_fed_and_never_grow(model, monkeypatch):
    audio, lens = _audio(model, LENS, seed=4)
    eos = _eos_by_construction(model, audio, lens)
    before: list[list[int]] = []  # cache lengths before each step call
    fed: list[list[int]] = []
    caches = []
    real_step = model.step

    def spy(tokens, cache, tree_mask=None, num_heads=None):
        before.append(cache.lengths.tolist())
        fed.append(tokens[:, 0].tolist())
        caches.append(cache)
        return real_step(tokens, cache, tree_mask, num_heads)

    monkeypatch.setattr(model, "step", spy)
    out = _greedy(model, audio, lens, DURATIONS, eos, compact=False)  # rows keep their index
    final = caches[-1].lengths.tolist()
    for b, d in enumerate(out):
        # the prefill leaves S_b + 1 slots; each later call of the sequence writes one kept token
        steps = d.decoder_calls - 1
        assert final[b] == LENS[b] + 1 + steps
        expected = [LENS[b] + 1 + min(i, steps) for i in range(len(before))]
        assert [row[b] for row in before] == expected
        # once finished it is fed only padding
        assert all(row[b] == model.config.pad_id for row in fed[steps:])
        assert [row[b] for row in fed[:steps]] == list(d.tokens[:steps])


def test_time_is_split_over_sequences(model):
    audio, lens = _audio(model, LENS, seed=5)
    out = _greedy(model, audio, lens, DURATIONS, NEVER)
    assert all(d.decoder_seconds > 0 for d in out)
    # the longest-running sequence pays for its share of every call, so it costs the most
    longest = max(range(len(out)), key=lambda b: out[b].decoder_calls)
    assert out[longest].decoder_seconds == max(d.decoder_seconds for d in out)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown decoding strategy 'nope'.*greedy"):
        get_strategy(DecodingOptions(strategy="nope"))


# --- greedy computes head 1 only, and head 1 does not depend on how many heads are computed -----

K = 4
MULTI_KINDS = sorted(kind for kind in HEADS if kind != "linear")


def _multi_head_model(kind: str) -> SpeechLLaMA:
    """The tiny preset with K = 4 heads of ``kind``, every head parameter moved off its init
    (which makes heads 2..K copies of head 1), fp32 as decoding runs."""
    torch.manual_seed(1)
    m = SpeechLLaMA(preset("tiny", VOCAB).replace(heads=HeadsConfig(kind, K))).eval()
    with torch.no_grad():
        for name, p in m.heads.named_parameters():
            if name != "proj.weight":
                p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_head_one_is_bitwise_the_same_for_any_number_of_heads(kind):
    """Head 1's logits with n = 1 equal those with n = 2..K bit for bit, position-wise and
    through the cache (prefill, 1-token and 3-token steps, batch 1 and 3): greedy computes one
    head, and verify/tree's exactness against it rests on this, near-ties included."""
    model = _multi_head_model(kind)
    d = model.config.decoder.d_model
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in [(1, 1), (3, 1), (2, 5)]:
            hidden = torch.randn(*shape, d, generator=g)
            one = model.heads(hidden, num_heads=1)
            assert one.shape == (*shape, 1, VOCAB)
            for n in range(2, K + 1):
                assert torch.equal(model.heads(hidden, num_heads=n)[:, :, :1], one), (shape, n)
        for lens in [[5], [6, 2, 4]]:
            audio, audio_lens = _audio(model, lens, seed=len(lens))
            audio = audio.float()
            caches = {n: model.new_cache(len(lens), 32) for n in (1, K)}
            head1 = {n: [model.prefill(audio, audio_lens, c, num_heads=n)[:, :, 0]]
                     for n, c in caches.items()}  # fmt: skip
            for width in (1, 3, 1):
                tokens = torch.randint(3, VOCAB, (len(lens), width), generator=g)
                for n, c in caches.items():
                    head1[n].append(model.step(tokens, c, num_heads=n)[:, :, 0])
            assert len(head1[1]) == 4
            for a, b in zip(head1[1], head1[K], strict=True):
                assert torch.equal(a, b)


def test_greedy_asks_for_head_one_only(monkeypatch):
    model = _multi_head_model("latent")
    asked: list[int | None] = []
    real_prefill, real_step = model.prefill, model.step

    def prefill(audio, audio_lens, cache, num_heads=None):
        asked.append(num_heads)
        return real_prefill(audio, audio_lens, cache, num_heads)

    def step(tokens, cache, tree_mask=None, num_heads=None):
        asked.append(num_heads)
        out = real_step(tokens, cache, tree_mask, num_heads)
        assert out.shape[2] == 1
        return out

    monkeypatch.setattr(model, "prefill", prefill)
    monkeypatch.setattr(model, "step", step)
    audio, lens = _audio(model, LENS, seed=6)
    out = _greedy(model, audio.float(), lens, DURATIONS, NEVER, num_heads=3)
    assert len(asked) == max(d.decoder_calls for d in out) > 1
    assert set(asked) == {1}


# --- batch compaction ------------------------------------------------------------------------


def _widths(model, monkeypatch) -> list[int]:
    """Record the batch width of every ``model.step`` call."""
    widths: list[int] = []
    real_step = model.step

    def spy(tokens, cache, tree_mask=None, num_heads=None):
        assert cache.batch_size == tokens.shape[0]
        widths.append(tokens.shape[0])
        return real_step(tokens, cache, tree_mask, num_heads)

    monkeypatch.setattr(model, "step", spy)
    return widths


def test_compaction_changes_no_result_and_narrows_the_calls(model, monkeypatch):
    lens8 = [7, 3, 11, 5, 9, 4, 6, 8]
    durations = [0.5, 0.2, 1.0, 0.1, 0.3, 0.9, 0.15, 0.6]  # limits from 18 to 28 tokens
    audio, lens = _audio(model, lens8, seed=7)
    full = _greedy(model, audio, lens, durations, NEVER, compact=False)
    widths = _widths(model, monkeypatch)
    compacted = _greedy(model, audio, lens, durations, NEVER)
    summary = [(d.tokens, d.decoder_calls, d.accepted_per_call) for d in compacted]
    assert summary == [(d.tokens, d.decoder_calls, d.accepted_per_call) for d in full]
    assert all(d.decoder_seconds > 0 for d in compacted)
    # rows run to their limits (18 .. 28 calls), so rows leave in groups and calls narrow
    assert widths[0] == 8 and widths == sorted(widths, reverse=True) and widths[-1] < 8
    assert sum(widths) < 8 * len(widths)
    assert len(widths) == max(d.decoder_calls for d in full) - 1  # the prefill is not a step


def test_state_compact_and_restore():
    state = DecodingState(eos_id=2, pad_id=0, max_tokens=[5, 6, 7, 8])
    for b in range(4):
        state.accept(b, [10 + b] * (b + 1))
    state.scratch["rows"] = torch.arange(8).view(4, 2)
    state.scratch["counts"] = [1, 2, 3, 4]
    state.shared["tree"] = torch.ones(4, 4)  # batch-wide: not cut though it has 4 rows
    state.charge([0, 1, 2, 3], 1, [0.1, 0.2, 0.3, 0.4])
    state.compact([3, 1])
    assert state.batch_size == 2 and state.origin == [3, 1]
    assert state.tokens == [[13] * 4, [11] * 2] and state.max_tokens == [8, 6]
    assert state.scratch["rows"].tolist() == [[6, 7], [2, 3]]
    assert state.scratch["counts"] == [4, 2]
    assert state.shared["tree"].shape == (4, 4)
    state.accept(0, [20])  # current row 0 is original row 3
    state.charge([0], 1, [1.0])
    state.restore()
    assert state.origin == [0, 1, 2, 3] and state.max_tokens == [5, 6, 7, 8]
    assert state.tokens == [[10], [11] * 2, [12] * 3, [13] * 4 + [20]]
    assert state.calls == [1, 1, 1, 2]
    assert state.decoder_seconds == [0.1, 0.2, 0.3, 0.4 + 1.0]
    state.scratch["tree"] = object()
    with pytest.raises(TypeError, match=r"scratch\['tree'\].*DecodingState.shared"):
        state.compact([0])
