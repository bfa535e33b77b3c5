"""Where the auxiliary CTC head reads: on a frozen encoder it must sit on the adapter's output,
or the CTC loss trains nothing but its own head (measured in session 2: the `small` preset's
CTC on frozen Whisper frames stayed at 6.5-7.5 nats per token and gave the decoder nothing)."""

from __future__ import annotations

import pytest
import torch
from helpers import N_MELS, TinyEncoder, tiny_decoder

from speechllama.model.config import AdapterConfig, ModelConfig, preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.train.data import collate
from speechllama.train.step import compute_loss


def _model(ctc_on: str) -> SpeechLLaMA:
    torch.manual_seed(0)
    cfg = ModelConfig(
        adapter=AdapterConfig(stack=2), decoder=tiny_decoder(), ctc=True, ctc_on=ctc_on
    )
    model = SpeechLLaMA(cfg, encoder=TinyEncoder())
    model.encoder.requires_grad_(False)  # a frozen pretrained encoder, as in `small`
    return model


def _batch() -> object:
    g = torch.Generator().manual_seed(1)
    examples = [
        {"inputs": torch.randn(n, N_MELS, generator=g), "target": [5, 6, 7, 2], "duration": 1.0,
         "index": i}
        for i, n in enumerate((16, 12))
    ]  # fmt: skip
    return collate(examples)


@pytest.mark.parametrize("ctc_on", ["encoder", "adapter"])
def test_ctc_head_reads_the_configured_input(ctc_on: str) -> None:
    model = _model(ctc_on)
    d_in = model.config.decoder.d_model if ctc_on == "adapter" else model.encoder.output_dim
    assert model.ctc_head.in_features == d_in
    loss = compute_loss(model, _batch(), ctc_weight=0.5)
    assert loss.ctc > 0
    _adapter_grad(model)
    assert all(p.grad is None for p in model.encoder.parameters())


def _adapter_grad(model: SpeechLLaMA) -> float:
    """Gradient mass on the adapter from a loss that is almost all CTC (CE weight 0.001)."""
    model.zero_grad()
    compute_loss(model, _batch(), ctc_weight=0.999).total.backward()
    return sum(float(p.grad.abs().sum()) for p in model.adapter.parameters())


def test_ctc_on_the_adapter_trains_the_adapter() -> None:
    # Same initial weights apart from the CTC head: on encoder frames the adapter only gets the
    # 0.001 CE share, on the adapter it gets the CTC gradient too.
    assert _adapter_grad(_model("adapter")) > 10 * _adapter_grad(_model("encoder"))


def test_ctc_only_on_adapter_when_encoder_frozen_in_small_preset() -> None:
    assert preset("small", 64).ctc_on == "adapter"
    with pytest.raises(ValueError, match="ctc_on"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "ctc_on": "decoder"})


def _tied_model() -> SpeechLLaMA:
    torch.manual_seed(0)
    cfg = ModelConfig(
        adapter=AdapterConfig(stack=2),
        decoder=tiny_decoder(),
        ctc=True,
        ctc_on="adapter",
        ctc_tied=True,
    )
    model = SpeechLLaMA(cfg, encoder=TinyEncoder())
    model.encoder.requires_grad_(False)
    model.decoder.requires_grad_(False)  # a frozen LLM: only the adapter (and scale) learn
    return model


def test_tied_ctc_scores_frames_against_the_token_embeddings() -> None:
    model = _tied_model()
    frames = torch.randn(2, 5, model.config.decoder.d_model)
    expected = frames @ model.decoder.embed.weight.t()  # scale exp(0) = 1 at the start
    torch.testing.assert_close(model.ctc_logits(frames), expected)
    # A frame equal to a token's embedding scores that token highest (embeddings of a fresh
    # decoder are nearly orthogonal): what lets CTC pull the adapter onto the LLM's inputs.
    emb = model.decoder.embed.weight
    assert int(model.ctc_logits(emb[None, 7:8].detach()).argmax()) == 7
    # One parameter, and the embedding stays the decoder's (not a copy in the state dict).
    assert [n for n, _ in model.ctc_head.named_parameters()] == ["log_scale"]


def test_tied_ctc_trains_the_adapter_and_scale_not_the_frozen_embedding() -> None:
    model = _tied_model()
    model.zero_grad()
    loss = compute_loss(model, _batch(), ctc_weight=0.5)
    assert loss.ctc > 0
    loss.total.backward()
    assert model.decoder.embed.weight.grad is None
    assert float(model.ctc_head.log_scale.grad.abs()) > 0
    assert sum(float(p.grad.abs().sum()) for p in model.adapter.parameters()) > 0


def test_tied_ctc_needs_the_adapter_side() -> None:
    with pytest.raises(ValueError, match="ctc_tied"):
        ModelConfig(decoder=tiny_decoder(), ctc=True, ctc_on="encoder", ctc_tied=True).validate()


def test_a_checkpoint_gains_a_tied_ctc_head_for_fine_tuning(tmp_path) -> None:
    from speechllama.train.build import with_ctc

    model = SpeechLLaMA(
        ModelConfig(adapter=AdapterConfig(stack=2), decoder=tiny_decoder()),
        encoder=TinyEncoder(),
    )
    assert model.ctc_head is None
    tuned = with_ctc(model, {"ctc": True, "ctc_on": "adapter", "ctc_tied": True})
    assert tuned.config.ctc_tied and tuned.ctc_head is not None
    frames = torch.randn(1, 3, tuned.config.decoder.d_model)
    assert tuned.ctc_logits(frames).shape == (1, 3, tuned.config.decoder.vocab_size)
    # Asking again for the head it has keeps it (a resumed stage must not reset it).
    head = tuned.ctc_head
    assert with_ctc(tuned, {"ctc": True, "ctc_on": "adapter", "ctc_tied": True}).ctc_head is head
    # --model-set ctc=false on a checkpoint drops the head with the flag.
    dropped = with_ctc(tuned, {"ctc": False})
    assert not dropped.config.ctc and dropped.ctc_head is None


@pytest.mark.parametrize(
    ("freeze", "given", "expected"),
    [((), None, 0.3), (("encoder", "adapter", "decoder"), None, 0.0), ((), 0.1, 0.1)],
)
def test_ctc_weight_defaults_off_when_the_trunk_is_frozen(freeze, given, expected) -> None:
    # Heads-only training on the trunk (say, after a CTC stage) must not spend a CTC pass that
    # can only train the CTC head itself.
    from speechllama.train.config import TrainConfig
    from speechllama.train.freeze import plan_run

    cfg = TrainConfig(
        train_manifest="t.jsonl", out_dir="o", preset="tiny", freeze=freeze, hidden_cache=False,
        ctc_weight=given,
    )  # fmt: skip
    assert plan_run(cfg, _model("adapter")).ctc_weight == expected
