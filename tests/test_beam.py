"""Beam search (``beam``) and prefix-based beam search (``prefix-beam``), and the N-best API.

On a tiny K = 4 model fitted to "sentences" of multi-token "words" (the heads can guess the rest
of a word, not the next word): beam size 1 is greedy; every reported score is recomputed from
one teacher-forced pass (head 1's log-probs for ``beam``, the heads' log-probs along the
hypothesis' blocks for ``prefix-beam``); every beam cache row holds exactly its hypothesis
after the reorders; batched equals one by one; prefix-beam with one head is beam; duplicates
merge; N-best lists are distinct and sorted."""

from __future__ import annotations

import argparse
import functools
import math

import pytest
import torch
from helpers import BOS, EOS, VOCAB, D, decoding_model, fit, held_out, run_decoding, summary

from speechllama.bench_methods import parse_methods
from speechllama.cli.transcribe import add_decoding_args, decoding_options
from speechllama.decoding import DecodingOptions, available_strategies, get_strategy
from speechllama.decoding.base import DecodingState, max_tokens_for
from speechllama.decoding.beam_search import BeamHypothesis, SearchState, normalised, rescored
from speechllama.decoding.nbest import Hypothesis, nbest, nbest_embeddings
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.train.mwer import hypothesis_batch, sequence_log_probs

torch.set_num_threads(1)
K, S, U, MAX_LEN = 4, 6, 20, 128
# 0.1 s caps a row at 16 + ceil(1.2) = 18 tokens, below a training sentence (19): the limit
# ends those rows. Rows 0-2 replay training audio, rows 3-6 are perturbed (less sure heads).
DURATIONS = [1.0, 0.1, 1.0, 1.0, 0.1, 1.0, 1.0]
LENS = [6, 6, 4, 6, 5, 6, 3]


def _sentences(n: int, g: torch.Generator) -> torch.Tensor:
    """n label rows y_1..y_{U-1} EOS made of random "words" (fixed runs of 2-4 tokens): the
    heads can learn the rest of a word but not which word comes next."""
    words = [torch.randint(3, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
             for _ in range(10)]  # fmt: skip
    rows = torch.empty(n, U, dtype=torch.long)
    for i in range(n):
        seq: list[int] = []
        while len(seq) < U - 1:
            seq += words[int(torch.randint(0, len(words), (1,), generator=g))].tolist()
        rows[i, : U - 1] = torch.tensor(seq[: U - 1])
        rows[i, U - 1] = EOS
    return rows


@functools.cache
def trained() -> tuple[SpeechLLaMA, torch.Tensor, torch.Tensor]:
    """The fitted K-head model (eval, fp32), decode audio (7, S, D) and lens (7,)."""
    model = decoding_model("latent", K, MAX_LEN)
    g = torch.Generator().manual_seed(3)
    audio = torch.randn(7, S, D, generator=g)
    fit(model, audio, torch.full((7,), S), _sentences(7, g), 150)
    return model, held_out(audio, 3, LENS, g), torch.tensor(LENS)


@pytest.fixture(scope="module")
def fitted() -> tuple[SpeechLLaMA, torch.Tensor, torch.Tensor]:
    return trained()


def run(model, audio, lens, durations=DURATIONS, compact=True, **opts):
    return run_decoding(model, audio, lens, durations, compact, **opts)


def lists(model, audio, lens, n, durations=DURATIONS, **opts) -> list[list[BeamHypothesis]]:
    with torch.inference_mode():
        return nbest_embeddings(model, audio, lens, durations, DecodingOptions(**opts), n)


def teacher_forced(model, audio, b: int, tokens) -> torch.Tensor:
    """Log-probs (len(tokens) + 1, K, V) of every head after [BOS] y_1..y_u, u = 0..len."""
    n = LENS[b]
    ids = torch.tensor([[BOS, *tokens]])
    with torch.inference_mode():
        logits = model(audio[b : b + 1, :n], torch.tensor([n]), ids, torch.tensor([ids.shape[1]]))
    return logits[0].float().log_softmax(dim=-1)


def block_score(logp: torch.Tensor, hyp: BeamHypothesis) -> float:
    """The heads' log-probs along the hypothesis' blocks: block i starts after position p and
    head k scores its k-th token there (one-token blocks: head 1 all along)."""
    seq = list(hyp.tokens) + ([EOS] if hyp.ended else [])
    total, p = 0.0, 0
    for j in hyp.blocks:
        total += sum(float(logp[p, k, seq[p + k]]) for k in range(j))
        p += j
    assert p == len(seq)
    return total


def test_strategies_are_discovered():
    assert {"beam", "prefix-beam"} <= set(available_strategies())
    assert get_strategy(DecodingOptions(strategy="prefix-beam")).name == "prefix-beam"
    with pytest.raises(ValueError, match="beam_size=0"):
        get_strategy(DecodingOptions(strategy="beam", beam_size=0))


@pytest.mark.parametrize("strategy", ["beam", "prefix-beam"])
def test_beam_size_one_is_greedy(fitted, strategy):
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    heads = 1 if strategy == "prefix-beam" else None
    out = run(model, audio, lens, strategy=strategy, beam_size=1, length_penalty=0.0,
              num_heads=heads)  # fmt: skip
    assert summary(out) == summary(greedy)
    limits = [max_tokens_for(d, DecodingOptions()) for d in DURATIONS]
    ends = {"limit" if len(d.tokens) == m else "eos" for d, m in zip(out, limits, strict=True)}
    assert ends == {"limit", "eos"}


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_scores_are_teacher_forced_log_probs(fitted, alpha):
    model, audio, lens = fitted
    found = lists(model, audio, lens, 4, strategy="beam", beam_size=4, length_penalty=alpha)
    decoded = run(model, audio, lens, strategy="beam", beam_size=4, length_penalty=alpha)
    checked = 0
    for b, hyps in enumerate(found):
        assert decoded[b].tokens == hyps[0].tokens
        for h in hyps:
            logp = teacher_forced(model, audio, b, h.tokens)[:, 0]
            seq = list(h.tokens) + ([EOS] if h.ended else [])
            ref = sum(float(logp[u, t]) for u, t in enumerate(seq))
            assert h.score == pytest.approx(ref, abs=1e-4)
            assert set(h.blocks) == {1}
            checked += 1
    assert checked == 4 * len(LENS)


def test_beam_finds_better_scores_than_greedy(fitted):
    """On perturbed audio a wider beam finds transcripts the model scores higher than greedy's
    (not vacuous: it differs from greedy somewhere), and never lower."""
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    best = lists(model, audio, lens, 1, strategy="beam", beam_size=4, length_penalty=0.0)
    differ = 0
    for b, (g, hyps) in enumerate(zip(greedy, best, strict=True)):
        logp = teacher_forced(model, audio, b, g.tokens)[:, 0]
        ended = len(g.tokens) < max_tokens_for(DURATIONS[b], DecodingOptions())
        seq = list(g.tokens) + ([EOS] if ended else [])
        g_score = sum(float(logp[u, t]) for u, t in enumerate(seq))
        assert hyps[0].score >= g_score - 1e-4
        differ += hyps[0].tokens != g.tokens
    assert differ >= 1


@pytest.mark.parametrize("strategy", ["beam", "prefix-beam"])
def test_batched_equals_one_by_one(fitted, strategy):
    model, audio, lens = fitted
    out = run(model, audio, lens, strategy=strategy, beam_size=3)
    together = lists(model, audio, lens, 3, strategy=strategy, beam_size=3)
    uncompacted = run(model, audio, lens, compact=False, strategy=strategy, beam_size=3)
    assert summary(uncompacted) == summary(out)
    for b, n in enumerate(LENS):
        one = (audio[b : b + 1, :n], lens[b : b + 1], DURATIONS[b : b + 1])
        alone = run(model, *one, strategy=strategy, beam_size=3)
        assert summary(alone) == summary(out[b : b + 1])
        alone_list = lists(model, *one[:2], 3, one[2], strategy=strategy, beam_size=3)[0]
        assert [h.tokens for h in alone_list] == [h.tokens for h in together[b]]
        for x, y in zip(alone_list, together[b], strict=True):
            assert x.score == pytest.approx(y.score, abs=1e-4)
    for d in out:  # histogram contract of every strategy
        assert sum(i * c for i, c in enumerate(d.accepted_per_call)) == len(d.tokens)
        assert sum(d.accepted_per_call) == d.decoder_calls


@pytest.mark.parametrize("strategy", ["beam", "prefix-beam"])
def test_cache_rows_hold_their_hypotheses(fitted, strategy, monkeypatch):
    """After every reorder, each beam cache row is its hypothesis: the logits a call returns at
    a row's last fed token equal a teacher-forced pass over that hypothesis' tokens."""
    model, audio, lens = fitted
    strat = get_strategy(DecodingOptions(strategy=strategy, beam_size=3))
    rows_seen: list[list[tuple[int, BeamHypothesis]]] = []
    logits_seen: list[torch.Tensor] = []
    real_advance, real_step = strat.advance, model.step

    def advance(m, cache, state: DecodingState):
        rows_seen.append(list(state.shared["beam"].rows))
        real_advance(m, cache, state)

    def step(tokens, cache, tree_mask=None, num_heads=None):
        logits = real_step(tokens, cache, tree_mask, num_heads)
        logits_seen.append(logits)
        return logits

    monkeypatch.setattr(strat, "advance", advance)
    monkeypatch.setattr(model, "step", step)
    from speechllama.decoding.base import decode

    with torch.inference_mode():
        decode(model, strat, audio, lens, DURATIONS, eos_id=EOS, pad_id=0, max_seq_len=MAX_LEN)
    assert len(rows_seen) == len(logits_seen) > 5
    checked = ragged = 0
    for rows, logits in zip(rows_seen, logits_seen, strict=True):
        ragged += len({len(h.pending) for _, h in rows}) > 1
        for r, (origin, h) in enumerate(rows[:: max(1, len(rows) // 4)]):
            r *= max(1, len(rows) // 4)
            ref = teacher_forced(model, audio, origin, h.tokens)[-1]  # (K, V)
            got = logits[r, len(h.pending) - 1].float().log_softmax(dim=-1)
            torch.testing.assert_close(got, ref[: got.shape[0]], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 20
    assert (ragged > 0) == (strategy == "prefix-beam")


def test_prefix_beam_with_one_head_is_beam(fitted):
    model, audio, lens = fitted
    beam = run(model, audio, lens, strategy="beam", beam_size=4)
    one = run(model, audio, lens, strategy="prefix-beam", beam_size=4, num_heads=1)
    assert summary(one) == summary(beam)
    a = lists(model, audio, lens, 4, strategy="beam", beam_size=4)
    b = lists(model, audio, lens, 4, strategy="prefix-beam", beam_size=4, num_heads=1)
    assert a == b


def test_prefix_beam_scores_are_sums_of_head_log_probs(fitted):
    model, audio, lens = fitted
    found = lists(model, audio, lens, 4, strategy="prefix-beam", beam_size=4)
    longest = 0
    for b, hyps in enumerate(found):
        assert len(hyps) == 4
        limit = max_tokens_for(DURATIONS[b], DecodingOptions())
        for h in hyps:
            assert len(h.tokens) <= limit and EOS not in h.tokens
            assert h.ended or len(h.tokens) == limit
            logp = teacher_forced(model, audio, b, h.tokens)
            assert h.score == pytest.approx(block_score(logp, h), abs=1e-4)
            longest = max(longest, *h.blocks)
    assert longest >= 3  # multi-token blocks were scored, not only head 1


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_rescored_scores_are_head_one_teacher_forced(fitted, alpha):
    """With ``prefix_rescore`` every finished hypothesis' score is head 1's teacher-forced
    log-prob of its tokens (+ EOS when it ended by one), the score MWER's
    ``sequence_log_probs`` gives it (which always adds the EOS), though its blocks were
    multi-token; it ends one head-1 token at a time; no extra decoder call is made for it."""
    model, audio, lens = fitted
    found = lists(model, audio, lens, 4, strategy="prefix-beam", beam_size=4,
                  length_penalty=alpha, prefix_rescore=True)  # fmt: skip
    hyps = [(b, h) for b, row in enumerate(found) for h in row]
    batch = hypothesis_batch(audio, lens, [b for b, _ in hyps], [h.tokens for _, h in hyps], EOS)
    with torch.inference_mode():
        mwer = sequence_log_probs(model, *batch).tolist()
    longest = 0
    for (b, h), ref in zip(hyps, mwer, strict=True):
        logp = teacher_forced(model, audio, b, h.tokens)[:, 0]
        seq = list(h.tokens) + ([EOS] if h.ended else [])
        teacher = sum(float(logp[u, t]) for u, t in enumerate(seq))
        assert h.score == pytest.approx(teacher, abs=1e-4)
        eos = 0.0 if h.ended else float(logp[-1, EOS])
        assert h.score + eos == pytest.approx(ref, abs=1e-4)
        assert h.blocks[-1] == 1 and h.provisional == 0.0
        longest = max(longest, *h.blocks)
    assert {h.ended for _, h in hyps} == {True, False}
    # measured: raw sums (alpha 0) keep one-token blocks only, so the search is beam's
    assert longest >= (3 if alpha == 1.0 else 1)
    plain = run(model, audio, lens, strategy="prefix-beam", beam_size=4, length_penalty=alpha)
    rescored = run(model, audio, lens, strategy="prefix-beam", beam_size=4,
                   length_penalty=alpha, prefix_rescore=True)  # fmt: skip
    assert [d.tokens for d in rescored] == [h[0].tokens for h in found]
    if alpha == 1.0:  # measured: 72 calls rescored, 79 plain, 171 beam
        assert sum(d.decoder_calls for d in rescored) <= sum(d.decoder_calls for d in plain)


def test_rescoring_replaces_the_heads_guesses():
    """Hypothesis "5" (score -1.0) + block "6 7" scored by heads 1, 2 (-0.1, -0.2: provisional
    -0.2) is rescored when the next call feeds "6 7": head 1's log-prob of 7 after "6" (about
    -3.05 here) replaces head 2's -0.2; a hypothesis whose last block is one token keeps its
    score."""
    a = BeamHypothesis((5, 6, 7), -1.3, (1, 2), provisional=-0.2)
    b = BeamHypothesis((5, 9), -0.7, (1, 1))
    logits = torch.randn(2, 2, 3, VOCAB)  # (R, k, n, V)
    logits[0, 0, 0] = -50.0
    logits[0, 0, 0, 7], logits[0, 0, 0, 8] = -3.0, 0.0  # head 1 after "6": mostly 8
    logp = logits[0, 0, 0].log_softmax(dim=-1)
    out = rescored([(0, a), (0, b)], logits)
    assert out[0][1].score == pytest.approx(-1.1 + float(logp[7]), abs=1e-6)
    assert out[0][1].provisional == 0.0 and out[1][1] == b


@pytest.mark.parametrize("rescore", [False, True])
def test_rescored_hypotheses_end_by_head_one(rescore):
    """Hypothesis "5" (-1.0), beam 1, length penalty 1: block "6 EOS" (heads 1, 2: -0.5,
    -0.001) ranks first, "6 7" next, head 1's EOS (-1.0) last. Plain prefix-beam pools "6 EOS"
    and never reaches the EOS; with rescoring a hypothesis ends by one head-1 token only, so
    "6 EOS" is passed over and head 1's EOS enters the pool although "6 7" filled the beam."""
    strat = get_strategy(DecodingOptions(strategy="prefix-beam", beam_size=1, num_heads=2,
                                         prefix_rescore=rescore))  # fmt: skip
    state = DecodingState(eos_id=EOS, pad_id=0, max_tokens=[10])
    search = SearchState(heads=2)
    search.rows = [(0, BeamHypothesis((5,), -1.0, (1,)))]
    from speechllama.model.kv_cache import KVCache

    search.cache = KVCache(1, 1, 1, 8, 2)
    logp = torch.full((1, 2, VOCAB), -20.0)
    logp[0, 0, 6], logp[0, 0, EOS] = -0.5, -1.0
    logp[0, 1, EOS], logp[0, 1, 7] = -0.001, -0.01
    strat._select(search, logp, [0], state)
    assert [h.tokens for _, h in search.rows] == [(5, 6, 7)]
    pool = {h.tokens: h for h in search.pools[0].values()}
    if rescore:
        assert list(pool) == [(5,)] and pool[(5,)].score == pytest.approx(-2.0)
        assert pool[(5,)].blocks == (1, 1) and pool[(5,)].ended
    else:
        assert list(pool) == [(5, 6)] and pool[(5, 6)].score == pytest.approx(-1.501)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "prefix-beam"])
def test_loop_cache_is_left_alone_by_beam_strategies(fitted, strategy, monkeypatch):
    """The beam strategies decode from their own cache (``own_cache``): the loop never
    compacts its idle one, while greedy on the same batch does."""
    import speechllama.decoding.base as base

    model, audio, lens = fitted
    calls: list[int] = []
    real = base.compact_finished

    def spy(state, cache):
        calls.append(len(state.live))
        return real(state, cache)

    monkeypatch.setattr(base, "compact_finished", spy)
    run(model, audio, lens, strategy=strategy, beam_size=3)
    assert get_strategy(DecodingOptions(strategy=strategy)).own_cache == (strategy != "greedy")
    assert bool(calls) == (strategy == "greedy")


def test_prefix_beam_needs_fewer_calls_than_beam(fitted):
    model, audio, lens = fitted
    beam = run(model, audio, lens, strategy="beam", beam_size=4)
    prefix = run(model, audio, lens, strategy="prefix-beam", beam_size=4)
    assert sum(d.decoder_calls for d in prefix) < 0.8 * sum(d.decoder_calls for d in beam)
    assert max(len(d.accepted_per_call) for d in prefix) > 2  # calls that kept 2+ tokens


def test_duplicates_merge_with_the_max_score():
    """Two hypotheses of one utterance reach (5, 6, 7): "5" + block "6 7" (heads 1, 2) and
    "5 6" + block "7" (head 1). One survives, with the larger score, and the shorter and longer
    candidates on its path ("5 6", "5 6 7 8") leave its slot to another path."""
    strat = get_strategy(DecodingOptions(strategy="prefix-beam", beam_size=2, num_heads=2))
    state = DecodingState(eos_id=EOS, pad_id=0, max_tokens=[10])
    search = SearchState(heads=2)
    a = BeamHypothesis((5,), -1.0, (1,))
    b = BeamHypothesis((5, 6), -0.5, (2,))
    search.rows = [(0, a), (0, b)]
    from speechllama.model.kv_cache import KVCache

    search.cache = KVCache(1, 2, 1, 8, 2)
    logp = torch.full((2, 2, VOCAB), -20.0)
    logp[0, 0, 6], logp[0, 1, 7] = -0.1, -0.2  # a: 6 then 7 -> -1.3
    logp[1, 0, 7], logp[1, 1, 8] = -0.3, -5.0  # b: 7 -> -0.8 (best); 7 8 -> -5.8
    strat._select(search, logp, [0, 1], state)
    kept = [h.tokens for _, h in search.rows]
    assert len(kept) == len(set(kept)) == 2
    assert (5, 6, 7) in kept
    merged = next(h for _, h in search.rows if h.tokens == (5, 6, 7))
    assert merged.score == pytest.approx(-0.8) and merged.blocks == (2, 1)


@pytest.mark.parametrize("strategy", ["beam", "prefix-beam"])
def test_nbest_api(fitted, strategy):
    model, audio, lens = fitted
    model.train()
    model.encoder.eval()
    options = DecodingOptions(strategy=strategy, beam_size=2, length_penalty=0.5)
    found = nbest(model, audio, lens, options, 6, durations=DURATIONS)
    assert model.training and not model.encoder.training  # each module's mode is back
    model.eval()
    assert len(found) == len(LENS)
    ref = lists(model, audio, lens, 6, strategy=strategy, beam_size=6, length_penalty=0.5)
    for hyps, full in zip(found, ref, strict=True):
        assert all(isinstance(h, Hypothesis) for h in hyps)
        assert len(hyps) == 6 and len({h.tokens for h in hyps}) == 6
        assert all(EOS not in h.tokens and BOS not in h.tokens for h in hyps)
        ranks = [normalised(h.score, f.scored, 0.5) for h, f in zip(hyps, full, strict=True)]
        assert ranks == sorted(ranks, reverse=True)
        assert [(h.tokens, h.score) for h in hyps] == [(f.tokens, f.score) for f in full]
    with pytest.raises(AttributeError):
        found[0][0].score = 0.0  # frozen
    # without durations the limits come from the embedding count: still a valid list
    assert all(math.isfinite(h.score) for h in nbest(model, audio, lens, options, 2)[0])


def test_bench_method_and_cli_flags():
    _, method, rescoring = parse_methods("prefix-beam@3,prefix-beam-rescored@2", DecodingOptions())
    assert method.name == "prefix-beam@3" and method.multi_token
    assert (method.options.strategy, method.options.beam_size) == ("prefix-beam", 3)
    assert not method.options.prefix_rescore
    assert rescoring.name == "prefix-beam-rescored@2" and rescoring.multi_token
    assert (rescoring.options.strategy, rescoring.options.beam_size) == ("prefix-beam", 2)
    assert rescoring.options.prefix_rescore
    with pytest.raises(ValueError, match="N must be at least 1"):
        parse_methods("prefix-beam@0", DecodingOptions())
    parser = argparse.ArgumentParser()
    add_decoding_args(parser)
    args = parser.parse_args(["--decoding", "prefix-beam", "--beam-size", "5",
                              "--length-penalty", "0.6"])  # fmt: skip
    options = decoding_options(args)
    assert (options.strategy, options.beam_size, options.length_penalty) == ("prefix-beam", 5, 0.6)
    assert options.prefix_rescore == DecodingOptions().prefix_rescore
    for flag, value in (("--prefix-rescore", True), ("--no-prefix-rescore", False)):
        assert decoding_options(parser.parse_args([flag])).prefix_rescore is value
