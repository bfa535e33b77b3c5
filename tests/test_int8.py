"""Int8 decoder calls (``SpeechLLaMA.set_decoder_int8``, ``bench --dtype int8``): each row's
matmul output depends on that row alone, the model stays close to fp32, verification equals
greedy on a model with clear margins, and training never sees the int8 path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_verify import DURATIONS, run, trained

from speechllama.model.int8 import int8_linear, quantize_weight

torch.set_num_threads(1)


def test_weights_quantize_per_channel_in_the_layout_int_mm_wants() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g) * torch.linspace(0.01, 3.0, 48)[:, None]
    w8, scale = quantize_weight(w)
    assert w8.dtype == torch.int8 and w8.shape == (40, 48) and w8.stride() == (1, 40)
    assert scale.shape == (48,) and int(w8.abs().max()) == 127
    # round to nearest: at most half a step per channel, whatever the channel's range
    assert ((w8.t().float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_is_close_to_fp32_and_each_row_depends_on_itself_only() -> None:
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 96, generator=g), torch.randn(2, 7, 96, generator=g)
    x[0, 3] *= 50.0  # one loud row must not change the others' scale
    w8, scale = quantize_weight(w)
    out = int8_linear(x, w8, scale)
    ref = F.linear(x, w)
    assert out.shape == ref.shape and out.dtype == torch.float32
    rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(rel.max()) < 0.02
    rows = x.reshape(-1, 96)
    alone = torch.cat([int8_linear(rows[i : i + 1], w8, scale) for i in range(len(rows))])
    assert torch.equal(alone, out.reshape(-1, 64))  # bit for bit, not just close


@pytest.fixture(scope="module")
def int8_model():
    model, audio, lens = trained("latent")
    yield model.set_decoder_int8(), audio, lens
    model.set_decoder_int8(False)  # the fitted model is shared with test_verify


def test_int8_verification_equals_int8_greedy_and_follows_fp32(int8_model) -> None:
    model, audio, lens = int8_model
    greedy = run(model, audio, lens, strategy="greedy")
    out = run(model, audio, lens, strategy="verify", verify="exact")
    assert [d.tokens for d in out] == [d.tokens for d in greedy]
    assert sum(d.decoder_calls for d in out) < sum(d.decoder_calls for d in greedy)
    for b in range(len(lens)):  # and a row on its own decodes as in the batch
        alone = run(model, audio[b : b + 1], lens[b : b + 1], DURATIONS[b : b + 1],
                    strategy="verify")  # fmt: skip
        assert alone[0].tokens == out[b].tokens
    model.set_decoder_int8(False)
    try:
        fp32 = run(model, audio, lens, strategy="greedy")
    finally:
        model.set_decoder_int8()
    same = sum(a.tokens == b.tokens for a, b in zip(fp32, greedy, strict=True))
    assert same >= len(lens) - 1, same  # the fitted model's margins survive int8 rounding


def test_int8_logits_are_close_and_training_passes_stay_fp32(int8_model) -> None:
    model, audio, lens = int8_model
    tokens = torch.tensor([[1, 5, 9, 13]] * len(lens))
    token_lens = torch.full((len(lens),), 4)

    def call() -> torch.Tensor:
        cache = model.new_cache(len(lens), 64)
        first = model.prefill(audio, lens, cache)
        return torch.cat([first, model.step(tokens[:, 1:], cache)], dim=1)

    q, teacher_q = call(), model(audio, lens, tokens, token_lens)
    model.set_decoder_int8(False)
    try:
        ref, teacher = call(), model(audio, lens, tokens, token_lens)
    finally:
        model.set_decoder_int8()
    assert not torch.equal(q, ref)  # int8 really ran
    assert (q - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(teacher_q, teacher)  # teacher forcing (training, scoring) is untouched
