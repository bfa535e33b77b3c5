"""Compiled decoder calls (``SpeechLLaMA.compile_calls``): the same logits and cache writes as
the eager call to fp32 rounding, greedy and exact verification unchanged token for token, one
graph for every cache length, and int8 refused. Compiling takes seconds per call shape, so the
model and graphs are shared by the module."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import D, decoding_model, fit, run_decoding

from speechllama.model.compiled import compile_available
from speechllama.model.speechllama import SpeechLLaMA

pytestmark = pytest.mark.skipif(compile_available() is not None, reason=str(compile_available()))

torch.set_num_threads(1)
K, S, U, MAX_LEN = 3, 6, 12, 96


@functools.cache
def models() -> tuple[SpeechLLaMA, SpeechLLaMA, torch.Tensor]:
    """(eager, compiled) copies of one small fitted latent-head model, and 4 audio rows."""
    eager = decoding_model("latent", K, MAX_LEN)
    g = torch.Generator().manual_seed(3)
    audio = torch.randn(4, S, D, generator=g)
    labels = torch.randint(3, 20, (4, U), generator=g)
    labels[:, -1] = 2  # EOS
    fit(eager, audio, torch.full((4,), S), labels, 60)
    compiled = copy.deepcopy(eager).compile_calls()
    return eager, compiled, audio


def _prefilled(model: SpeechLLaMA, audio: torch.Tensor, max_len: int):
    cache = model.decoder.new_cache(audio.shape[0], max_len)
    model.prefill(audio, torch.full((audio.shape[0],), S), cache)
    return cache


@pytest.mark.parametrize("k", [1, 3])
def test_step_matches_eager(k: int) -> None:
    eager, compiled, audio = models()
    tokens = torch.arange(3, 3 + k).expand(1, k)
    with torch.inference_mode():
        ce, cc = _prefilled(eager, audio[:1], 40), _prefilled(compiled, audio[:1], 40)
        want, got = eager.step(tokens, ce), compiled.step(tokens, cc)
    assert got.shape == want.shape == (1, k, K, eager.config.decoder.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cc.lengths, ce.lengths)
    n = int(ce.lengths.max())  # what the call wrote is what the eager call wrote
    torch.testing.assert_close(cc.k[:, :, :, :n], ce.k[:, :, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cc.v[:, :, :, :n], ce.v[:, :, :, :n], atol=1e-5, rtol=1e-5)


def test_tree_call_matches_eager() -> None:
    eager, compiled, audio = models()
    tokens = torch.tensor([[5, 6, 7, 8]])
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    with torch.inference_mode():
        ce, cc = _prefilled(eager, audio[:1], 40), _prefilled(compiled, audio[:1], 40)
        want, got = eager.step(tokens, ce, tree), compiled.step(tokens, cc, tree)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_new_shapes_do_not_recompile() -> None:
    """A new cache length (every utterance), batch size (finished rows leave) or block length
    (threshold acceptance) reuses the graph traced first."""
    from torch._dynamo.utils import counters

    _, compiled, audio = models()
    with torch.inference_mode():
        compiled.step(torch.tensor([[4]]), _prefilled(compiled, audio[:1], 30))
        compiled.step(torch.full((2, 2), 4), _prefilled(compiled, audio[:2], 30))
        before = counters["stats"]["unique_graphs"]
        for max_len in (31, 47, 64):
            compiled.step(torch.tensor([[4]]), _prefilled(compiled, audio[:1], max_len))
        for rows, k in ((3, 2), (2, 3), (4, 3)):
            compiled.step(torch.full((rows, k), 4), _prefilled(compiled, audio[:rows], 41))
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("strategy,draft", [("greedy", 0.0), ("verify", 0.0), ("verify", 0.5)])
def test_decoding_unchanged(strategy: str, draft: float) -> None:
    """Verification with confidence-gated drafting (draft > 0) feeds 1..K tokens per call."""
    eager, compiled, audio = models()
    lens = torch.full((1,), S)
    for row in range(audio.shape[0]):
        want = run_decoding(eager, audio[row : row + 1], lens, [1.0], strategy="greedy")
        got = run_decoding(compiled, audio[row : row + 1], lens, [1.0], strategy=strategy,
                           draft_threshold=draft)  # fmt: skip
        assert got[0].tokens == want[0].tokens
        assert len(got[0].tokens) > 0


def test_int8_refused() -> None:
    eager, _, _ = models()
    model = copy.deepcopy(eager)
    model.compile_calls()
    with pytest.raises(ValueError, match="int8"):
        model.set_decoder_int8(True)
    model = copy.deepcopy(eager).set_decoder_int8(True)
    with pytest.raises(ValueError, match="int8"):
        model.compile_calls()


def test_warm_up_compiles_what_threshold_decoding_meets() -> None:
    """Threshold acceptance feeds 1..K tokens a call; after ``warm_up`` none of it compiles."""
    from torch._dynamo.utils import counters

    _, compiled, audio = models()
    compiled.compiled.warm_up(compiled, None)
    before = counters["stats"]["unique_graphs"]
    lens = torch.full((1,), S)
    for row in range(audio.shape[0]):
        run_decoding(compiled, audio[row : row + 1], lens, [1.0], strategy="threshold")
    assert counters["stats"]["unique_graphs"] == before


def test_layer_heads_compile_and_warm_up() -> None:
    """``layer`` heads attend over the cache with layers of their own (``model.new_cache``)
    and read their width back, which splits the graph; the call must stay correct."""
    eager = decoding_model("layer", K, MAX_LEN).eval()
    compiled = copy.deepcopy(eager).compile_calls()
    compiled.compiled.warm_up(compiled, None)
    audio = torch.randn(2, S, D, generator=torch.Generator().manual_seed(5))
    tokens = torch.tensor([[4, 5], [6, 7]])
    out = []
    with torch.inference_mode():
        for model in (eager, compiled):
            cache = model.new_cache(2, 40)
            model.prefill(audio, torch.tensor([S, S - 1]), cache)
            out.append(model.step(tokens, cache))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)
