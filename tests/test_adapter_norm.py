"""The adapter output norm, its per-utterance input normalisation, and dotted model-config
overrides (``train --model-set``)."""

from __future__ import annotations

import pytest
import torch

from speechllama.cli.train import parse_key_values
from speechllama.model.config import ModelConfig, preset
from speechllama.model.speechllama import SpeechLLaMA


def _tiny(**overrides: object) -> ModelConfig:
    return preset("tiny", 64).with_overrides(dict(overrides))


def test_overrides_set_nested_keys_and_validate() -> None:
    cfg = _tiny(**{"adapter.norm": "rms", "decoder.dropout": 0.2, "adapter.hidden": 32})
    assert (cfg.adapter.norm, cfg.decoder.dropout, cfg.adapter.hidden) == ("rms", 0.2, 32)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # survives config.json
    with pytest.raises(ValueError, match="no such config key"):
        _tiny(**{"adapter.nrom": "rms"})
    with pytest.raises(ValueError, match="no such config section"):
        _tiny(**{"adaptor.norm": "rms"})
    with pytest.raises(ValueError, match=r"adapter\.norm"):
        _tiny(**{"adapter.norm": "layer"})
    with pytest.raises(ValueError, match=r"adapter\.input_norm"):
        _tiny(**{"adapter.input_norm": "batch"})


def test_old_configs_without_norm_load_unchanged() -> None:
    data = preset("tiny", 64).to_dict()
    del data["adapter"]["norm"], data["adapter"]["input_norm"]
    cfg = ModelConfig.from_dict(data)
    assert (cfg.adapter.norm, cfg.adapter.input_norm) == ("none", "none")


def test_utterance_norm_removes_each_utterances_offset_and_scale_and_ignores_padding() -> None:
    torch.manual_seed(0)
    model = SpeechLLaMA(_tiny(**{"adapter.input_norm": "utterance"})).eval()
    d = model.encoder.output_dim
    frames = torch.randn(2, 12, d)
    lens = torch.tensor([12, 7])
    frames[1, 7:] = 1e4  # padding: must not move row 1's statistics
    out, _ = model.adapter(frames, lens)
    # a voice's constant offset and gain per channel: the decoder sees the same embeddings
    shifted = frames * (1.0 + torch.rand(1, 1, d)) + 5.0 * torch.randn(1, 1, d)
    torch.testing.assert_close(model.adapter(shifted, lens)[0], out, rtol=1e-4, atol=1e-4)
    alone, _ = model.adapter(frames[1:, :7], lens[1:])
    torch.testing.assert_close(out[1, :4], alone[0])  # batch-independent
    plain = SpeechLLaMA(_tiny()).eval()
    plain.adapter.load_state_dict(model.adapter.state_dict())  # no parameters of its own
    assert not torch.allclose(plain.adapter(shifted, lens)[0], out)


def test_rms_norm_puts_audio_at_the_text_embedding_scale() -> None:
    torch.manual_seed(0)
    model = SpeechLLaMA(_tiny(**{"adapter.norm": "rms"})).eval()
    frames = 50.0 * torch.randn(2, 12, model.encoder.output_dim)  # large, like trained outputs
    audio, lens = model.adapter(frames, torch.tensor([12, 7]))
    text_rms = model.decoder.embed.weight.pow(2).mean().sqrt()
    audio_rms = audio[0].pow(2).mean().sqrt()
    assert lens.tolist() == [6, 4]
    torch.testing.assert_close(audio_rms, text_rms, rtol=0.05, atol=0.0)
    plain = SpeechLLaMA(_tiny()).eval()
    assert plain.adapter.norm is None


def test_model_set_values_parse_as_json() -> None:
    got = parse_key_values(["adapter.norm=rms", "decoder.dropout=0.2", "adapter.hidden=768"], "x")
    assert got == {"adapter.norm": "rms", "decoder.dropout": 0.2, "adapter.hidden": 768}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_values(["adapter.norm"], "--model-set")


def test_a_checkpoint_with_the_norm_saves_and_loads(tmp_path) -> None:
    from test_transcribe import SENTENCES

    from speechllama.checkpoint import load_checkpoint, save_checkpoint
    from speechllama.text import train_tokenizer

    tok = train_tokenizer(SENTENCES, tmp_path / "t.model", vocab_size=40)
    torch.manual_seed(0)
    model = SpeechLLaMA(preset("tiny", tok.vocab_size).with_overrides({"adapter.norm": "rms"}))
    with torch.no_grad():
        model.adapter.norm.weight.mul_(3.0)  # a trained gain, not the initial one
    save_checkpoint(model, tok, tmp_path / "ckpt")
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.adapter.norm.weight, model.adapter.norm.weight)
