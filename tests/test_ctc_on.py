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
