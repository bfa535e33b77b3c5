"""Checkpoint directories: exact round trip, sourced encoders, atomic saves, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from speechllama import checkpoint as ckpt
from speechllama.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from speechllama.model.config import ModelConfig, preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import Tokenizer, train_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog ran home", "open the red door", "we like tea"] * 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(SENTENCES, path, vocab_size=28)


def _model(tokenizer: Tokenizer, **encoder_changes: object) -> SpeechLLaMA:
    torch.manual_seed(0)
    cfg = preset("tiny", tokenizer.vocab_size)
    if encoder_changes:
        cfg = cfg.replace(
            encoder=cfg.encoder.__class__(**{**cfg.encoder.__dict__, **encoder_changes})
        )
    return SpeechLLaMA(cfg.replace(ctc=True)).eval()


def _logits(model: SpeechLLaMA) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 120, 80, generator=g)
    emb, lens = model.encode(feats, torch.tensor([120, 90]))
    tokens = torch.tensor([[1, 5, 6, 7], [1, 9, 0, 0]])
    with torch.no_grad():
        return model(emb, lens, tokens, torch.tensor([4, 2]))


def test_round_trip_gives_identical_logits(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = _model(tokenizer)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", meta={"steps": 7})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.model"]  # fmt: skip
    loaded, tok, doc = load_checkpoint(out)
    assert loaded.config == model.config
    assert not loaded.training
    assert tok.model_proto == tokenizer.model_proto
    assert doc["training"] == {"steps": 7}
    assert doc["weights"]["encoder"] == "checkpoint"
    assert torch.equal(_logits(loaded), _logits(model))
    assert ModelConfig.from_dict(json.loads((out / "config.json").read_text())["model"]) == (
        model.config
    )


def test_bf16_storage_halves_size_and_stays_close(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = _model(tokenizer)
    full = save_checkpoint(model, tokenizer, tmp_path / "fp32")
    half = save_checkpoint(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    ratio = (half / "model.safetensors").stat().st_size / (
        full / "model.safetensors"
    ).stat().st_size
    assert 0.45 < ratio < 0.6
    with safe_open(str(half / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    loaded, _, doc = load_checkpoint(half)
    assert doc["weights"]["dtype"] == "bfloat16"
    assert next(loaded.parameters()).dtype == torch.float32
    ref, got = _logits(model), _logits(loaded)
    assert not torch.equal(ref, got)
    assert torch.allclose(ref, got, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="dtype"):
        save_checkpoint(model, tokenizer, tmp_path / "x", dtype="int8")


def test_sourced_frozen_encoder_is_omitted_and_loaded_from_source(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tokenizer, source="fake-package:tiny", frozen=True)
    reference = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    calls: list[str] = []

    def fake_source(encoder: torch.nn.Module, source: str) -> None:
        calls.append(source)
        encoder.load_state_dict(reference)

    import speechllama.model.weights as weights

    monkeypatch.setattr(weights, "load_encoder_weights", fake_source)
    out = save_checkpoint(model, tokenizer, tmp_path / "sourced")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and not any(n.startswith("encoder.") for n in names)
    assert any(n.startswith("ctc_head.") for n in names)  # trained parts stay
    loaded, _, doc = load_checkpoint(out)
    assert calls == ["fake-package:tiny"]
    assert doc["weights"]["encoder"] == "source"
    assert torch.equal(_logits(loaded), _logits(model))
    # A sourced encoder that was fine-tuned (not frozen) is stored like any other part.
    tuned = _model(tokenizer, source="fake-package:tiny", frozen=False)
    out2 = save_checkpoint(tuned, tokenizer, tmp_path / "tuned")
    with safe_open(str(out2 / "model.safetensors"), framework="pt") as f:
        assert any(n.startswith("encoder.") for n in f.keys())  # noqa: SIM118
    load_checkpoint(out2)
    assert calls == ["fake-package:tiny"]


def test_interrupted_save_leaves_nothing_loadable(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tokenizer)
    first = save_checkpoint(model, tokenizer, tmp_path / "step-00000001")
    before = (first / "model.safetensors").read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, tmp_path / "step-00000001")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, tmp_path / "step-00000002")
    # The old checkpoint is intact, the new one never appeared, no temporary is left behind.
    assert (first / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    monkeypatch.undo()
    second = save_checkpoint(model, tokenizer, tmp_path / "step-00000001")  # replaces
    assert (second / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_leftover_tmp_and_incomplete_dirs_are_ignored_and_refused(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    model = _model(tokenizer)
    good = save_checkpoint(model, tokenizer, tmp_path / "step-00000005")
    leftover = tmp_path / "step-00000009.tmp-abc123"
    leftover.mkdir()
    for f in good.iterdir():
        (leftover / f.name).write_bytes(f.read_bytes())
    incomplete = tmp_path / "step-00000010"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    assert list_checkpoints(tmp_path) == [good]
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(leftover)
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(incomplete)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_bad_configs_and_tensors_are_refused_with_the_file_named(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    model = _model(tokenizer)
    out = save_checkpoint(model, tokenizer, tmp_path / "c")
    cfg_file = out / "config.json"
    doc = json.loads(cfg_file.read_text())

    def write(d: dict) -> None:
        cfg_file.write_text(json.dumps(d))

    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(out)
    huge = json.loads(json.dumps(doc))
    huge["model"]["decoder"]["d_model"] = 10**9  # refused before anything is allocated
    write(huge)
    with pytest.raises(CheckpointError, match=r"decoder\.d_model"):
        load_checkpoint(out)
    unknown = json.loads(json.dumps(doc))
    unknown["model"]["decoder"]["evil"] = 1
    write(unknown)
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_checkpoint(out)
    wider = json.loads(json.dumps(doc))
    wider["model"]["decoder"]["d_ff"] = 200  # valid config, wrong tensors
    write(wider)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* has shape"):
        load_checkpoint(out)
    no_ctc = json.loads(json.dumps(doc))
    no_ctc["model"]["ctc"] = False
    write(no_ctc)
    with pytest.raises(CheckpointError, match=r"unexpected \['ctc_head"):
        load_checkpoint(out)
    write(doc)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_checkpoint(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(out)


def test_train_state_round_trips_without_pickle(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = _model(tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    loss = _logits_train(model)
    loss.backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "sampler": {"epoch": 3, "batches_done": 11, "seed": 0},
        "best": {"dev_wer": float("inf")},
    }
    out = save_checkpoint(model, tokenizer, tmp_path / "s", meta={}, train_state=state)
    assert {p.suffix for p in out.iterdir()} == {".json", ".safetensors", ".model"}
    back = load_train_state(out)
    assert back["sampler"] == state["sampler"]
    assert back["best"]["dev_wer"] == float("inf")
    assert torch.equal(back["rng"], state["rng"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys kept
    for k, v in state["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(back["optimizer"]["state"][k][name], t)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    with pytest.raises(CheckpointError, match="no training state"):
        load_train_state(save_checkpoint(model, tokenizer, tmp_path / "plain"))


def _logits_train(model: SpeechLLaMA) -> torch.Tensor:
    feats = torch.randn(1, 80, 80)
    emb, lens = model.encode(feats, torch.tensor([80]))
    return model(emb, lens, torch.tensor([[1, 5, 6]]), torch.tensor([3])).float().pow(2).mean()


def test_tied_ctc_head_survives_a_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    # Resuming a run that added CTC through the LLM's embeddings must get its scale back.
    cfg = preset("tiny", tokenizer.vocab_size).replace(ctc=True, ctc_on="adapter", ctc_tied=True)
    model = SpeechLLaMA(cfg)
    with torch.no_grad():
        model.ctc_head.log_scale.fill_(0.75)
    loaded, _, _ = load_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "ckpt"))
    assert loaded.config.ctc_tied
    assert float(loaded.ctc_head.log_scale.detach()) == 0.75
