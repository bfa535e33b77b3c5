"""Confidence-gated drafting in verification (``draft_threshold``): the output stays greedy's
token for token whatever the threshold, each call feeds y and exactly the proposals whose
chained confidence clears the threshold (batched: the mean over live rows), and the bench and CLI
spell it ``verify-exact@P`` and ``--draft-threshold P``."""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import pytest
import torch
from helpers import record_steps
from test_verify import DURATIONS, LENS, run, trained

from speechllama.bench_methods import parse_methods
from speechllama.cli.transcribe import add_decoding_args, decoding_options
from speechllama.decoding import DecodingOptions, drafting, get_strategy
from speechllama.decoding.drafting import MAX_AUTO, threshold_from_costs
from speechllama.decoding.verify import draft_width

torch.set_num_threads(1)
K = 4


@pytest.fixture(scope="module", params=["latent", "layer"])
def fitted(request: pytest.FixtureRequest):
    return trained(request.param)


def _widths(model, audio, lens, monkeypatch, **opts) -> tuple[list, list[int]]:
    widths = record_steps(model, monkeypatch, lambda tokens, *_: tokens.shape[1])
    out = run(model, audio, lens, strategy="verify", **opts)
    monkeypatch.undo()
    return out, widths


@pytest.mark.parametrize("threshold", [1e-6, 0.3, 0.7, 1.0])
def test_any_threshold_keeps_greedy_output(fitted, threshold, monkeypatch):
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    full, full_widths = _widths(model, audio, lens, monkeypatch)
    out, widths = _widths(model, audio, lens, monkeypatch, draft_threshold=threshold)
    assert [d.tokens for d in out] == [d.tokens for d in greedy]
    for d in out:
        assert sum(i * c for i, c in enumerate(d.accepted_per_call)) == len(d.tokens)
    assert set(full_widths) == {K}  # every fixed-width call feeds K
    calls = sum(d.decoder_calls for d in out)
    assert calls >= sum(d.decoder_calls for d in full)  # fewer proposals never save a call
    if threshold == 1e-6:  # every proposal clears it: the fixed-width run exactly
        assert widths == full_widths
        assert [d.accepted_per_call for d in out] == [d.accepted_per_call for d in full]
    else:  # batched, the rows' mean decides: never wider than fixed, narrower at 1.0
        assert max(widths) <= K and (threshold < 1.0 or sum(widths) < sum(full_widths))
    for b, m in enumerate(LENS):  # batched and alone agree
        alone = run(model, audio[b : b + 1, :m], lens[b : b + 1], DURATIONS[b : b + 1],
                    strategy="verify", draft_threshold=threshold)  # fmt: skip
        assert alone[0].tokens == out[b].tokens


def test_a_middle_threshold_mixes_widths(fitted, monkeypatch):
    """Not vacuous: one row at a time, the fitted models are confident about some proposals
    and not others, so calls of several widths occur and fewer tokens are fed in all."""
    model, audio, lens = fitted
    widths: list[int] = []
    for b, m in enumerate(LENS):
        one = (audio[b : b + 1, :m], lens[b : b + 1])
        widths += _widths(model, *one, monkeypatch, durations=DURATIONS[b : b + 1],
                          draft_threshold=0.5)[1]  # fmt: skip
    assert len(set(widths)) >= 2, widths
    assert sum(widths) < K * len(widths)


def _logged_row(model, monkeypatch, b: int, m: int, audio, lens, threshold: float):
    """Row b decoded alone; (its result, [(width fed, cache length before, logits)] per step)."""
    logged: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    real_step = model.step

    def spy(tokens, cache, tree_mask=None, num_heads=None):
        before = cache.lengths.clone()
        logits = real_step(tokens, cache, tree_mask, num_heads)
        logged.append((tokens.shape[1], before, logits))
        return logits

    monkeypatch.setattr(model, "step", spy)
    out = run(model, audio[b : b + 1, :m], lens[b : b + 1], DURATIONS[b : b + 1],
              strategy="verify", draft_threshold=threshold)  # fmt: skip
    monkeypatch.undo()
    return out[0], logged


def test_each_call_feeds_the_proposals_whose_chained_confidence_clears_it(fitted, monkeypatch):
    """One row at a time: the width of call i + 1 follows from call i's logits at the kept
    position (heads 2..n's top probabilities, multiplied along the chain)."""
    model, audio, lens = fitted
    threshold = 0.5
    checked = 0
    for b, m in enumerate(LENS):
        out, logged = _logged_row(model, monkeypatch, b, m, audio, lens, threshold)
        assert len(logged) == sum(out.accepted_per_call) - 1  # the prefill is not a step
        for (_, before, logits), (width, after, _) in itertools.pairwise(logged):
            kept = int(after[0] - before[0]) - 1  # proposals accepted in the earlier call
            top = torch.softmax(logits[0, kept, 1:].float(), dim=-1).amax(dim=-1)
            assert width == 1 + int((top.cumprod(0) >= threshold).sum())
            checked += 1
    assert checked >= 10


def test_threshold_is_checked_and_spelled_in_bench_and_cli():
    with pytest.raises(ValueError, match="draft threshold"):
        get_strategy(DecodingOptions(strategy="verify", draft_threshold=1.5))
    with pytest.raises(ValueError, match="draft threshold"):
        get_strategy(DecodingOptions(strategy="verify", draft_threshold=-0.1))
    _, plain, gated = parse_methods("verify-exact,verify-exact@0.30+compiled", DecodingOptions())
    assert plain.options.draft_threshold == 0.0
    assert (gated.name, gated.options.draft_threshold) == ("verify-exact@0.3+compiled", 0.3)
    assert gated.compiled and gated.options.verify == "exact"
    for bad in ("verify-exact@0", "verify-exact@1.2", "verify-exact@x"):
        with pytest.raises(ValueError, match="verify-exact@"):
            parse_methods(bad, DecodingOptions())
    parser = argparse.ArgumentParser()
    add_decoding_args(parser)
    args = parser.parse_args(["--decoding", "verify", "--draft-threshold", "0.4"])
    assert decoding_options(args).draft_threshold == 0.4


def test_draft_widths_script(tmp_path, capsys):
    """scripts/draft_widths.py on a tiny checkpoint: one JSON line per threshold, every
    transcript greedy's, fixed width K, narrower calls when gated."""
    import importlib.util
    import json
    from pathlib import Path

    from test_transcribe import SENTENCES, write_wav

    from speechllama.checkpoint import save_checkpoint
    from speechllama.model.config import HeadsConfig, preset
    from speechllama.model.speechllama import SpeechLLaMA
    from speechllama.text import train_tokenizer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("draft_widths", root / "scripts/draft_widths.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tok = train_tokenizer(SENTENCES, tmp_path / "tokenizer.model", vocab_size=40)
    torch.manual_seed(0)
    config = preset("tiny", tok.vocab_size).replace(heads=HeadsConfig("latent", K))
    ckpt = save_checkpoint(SpeechLLaMA(config).eval(), tok, tmp_path / "ckpt")
    rows = [{"audio_filepath": str(write_wav(tmp_path / f"{i}.wav", 0.6 + 0.3 * i, seed=i)),
             "text": "a", "duration": 0.6 + 0.3 * i} for i in range(3)]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script.main([str(manifest), "--model", str(ckpt), "--thresholds", "0,0.5"])
    fixed, gated = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert fixed["same_as_greedy"] == gated["same_as_greedy"] == fixed["utterances"] == 3
    assert fixed["fed_per_step"] == K and list(fixed["width_hist"]) == [str(K)]
    assert gated["fed_per_step"] < K  # random heads are never that sure


# --- draft_threshold="auto": the gate from this machine's call costs -----------------------------


def test_auto_threshold_is_the_measured_slope_clamped():
    assert threshold_from_costs(1.0, 1.45, 4) == pytest.approx(0.15)
    assert threshold_from_costs(1.0, 0.98, 4) == 0.0  # a GPU: wider is free, feed everything
    assert threshold_from_costs(1.0, 9.0, 4) == MAX_AUTO  # a gate that high would feed nothing


def test_auto_is_measured_once_per_model_and_batch_and_keeps_greedy(fitted, monkeypatch):
    model, audio, lens = fitted
    greedy = run(model, audio, lens, strategy="greedy")
    measured: list[tuple[int, int]] = []
    real = drafting.call_costs

    def spy(m, batch_size, num_heads, widths):
        measured.append((batch_size, num_heads))
        return real(m, batch_size, num_heads, widths)

    monkeypatch.setattr(drafting, "call_costs", spy)
    calls = model.decoder_calls
    auto = DecodingOptions(strategy="verify", draft_threshold="auto", batch_size=8)
    p = get_strategy(auto, model).options.draft_threshold
    assert 0.0 <= p <= MAX_AUTO and model.decoder_calls == calls  # timing is not decoding
    get_strategy(auto, model)
    get_strategy(dataclasses.replace(auto, batch_size=1), model)
    assert measured == [(8, K), (1, K)]  # cached per (model, batch size, heads, threads)
    out = run(model, audio, lens, strategy="verify", draft_threshold="auto", batch_size=8)
    assert [d.tokens for d in out] == [d.tokens for d in greedy]
    with pytest.raises(ValueError, match="measured on a model"):
        get_strategy(auto)  # no model to measure


@pytest.mark.parametrize(("wide", "gated"), [(1.0, False), (3.0, True)])
def test_auto_feeds_everything_where_wide_calls_are_free(fitted, monkeypatch, wide, gated):
    """Fake costs: flat (a GPU) gives P = 0 and the paper's fixed width; steep gives the cap."""
    model, audio, lens = fitted
    monkeypatch.setattr(drafting, "call_costs", lambda m, b, k, ws: {1: 1.0, k: wide})
    drafting._CHOSEN.pop(model, None)
    opts = DecodingOptions(strategy="verify", draft_threshold="auto", batch_size=1)
    assert get_strategy(opts, model).options.draft_threshold == (MAX_AUTO if gated else 0.0)
    _, widths = _widths(model, audio, lens, monkeypatch, draft_threshold="auto", batch_size=1)
    explicit = MAX_AUTO if gated else 0.0
    _, same = _widths(model, audio, lens, monkeypatch, draft_threshold=explicit, batch_size=1)
    assert widths == same and (set(widths) == {K}) == (not gated or min(same) == K)
    drafting._CHOSEN.pop(model, None)  # the fake costs must not outlive the test


def test_auto_is_spelled_in_bench_and_cli():
    _, method = parse_methods("verify-exact@auto", DecodingOptions())
    assert (method.name, method.options.draft_threshold) == ("verify-exact@auto", "auto")
    _, tree = parse_methods("tree-draft@auto", DecodingOptions())
    assert tree.options.draft_threshold == "auto"
    parser = argparse.ArgumentParser()
    add_decoding_args(parser)
    args = parser.parse_args(["--decoding", "verify", "--draft-threshold", "auto"])
    assert decoding_options(args).draft_threshold == "auto"
    for bad in ("2", "often"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--draft-threshold", bad])


def test_batched_width_follows_the_mean_confidence_of_live_rows():
    conf = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.1, 0.0], [0.6, 0.6, 0.6]])
    # means per depth: 0.6, 0.4, 0.233
    assert draft_width(conf, None, 0.5) == 2
    assert draft_width(conf, None, 0.2) == 4
    assert draft_width(conf[:1], None, 0.5) == 3  # one row: its own longest confident prefix
    live = torch.tensor([True, False, True])  # means 0.75, 0.55, 0.35
    assert draft_width(conf, live, 0.5) == 3
    assert draft_width(conf, torch.zeros(3, dtype=torch.bool), 0.5) == 1
    # The widest row alone would feed 4 at P = 0.5; the batch rule feeds 2.
    assert draft_width(conf[2:], None, 0.5) == 4
