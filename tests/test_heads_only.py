"""Heads-only training on a frozen trunk: the cached decoder hidden states give the full path's
loss, training never runs the trunk once they are cached, head 1 (and so greedy decoding) is
unchanged, verify stays exactly greedy, and ``layer`` heads are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import _cfg, _Interrupt, _recording, make_corpus

from speechllama import DecodingOptions, load_model
from speechllama.data.manifest import load_manifest
from speechllama.model.decoder import LlamaDecoder
from speechllama.train import loop
from speechllama.train.config import TrainConfig
from speechllama.train.hidden import HIDDEN_PREFIX, hidden_fingerprint
from speechllama.train.metrics import dev_line
from speechllama.train.step import compute_loss
from speechllama.train.validate import validate

torch.set_num_threads(1)

HEADS_ONLY = ("encoder", "adapter", "decoder")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base(corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A next-token model trained briefly on the corpus, so its transcripts are not noise."""
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    cfg = _cfg(corpus, out, max_steps=120, grad_accum=1, lr=5e-3, save_every=1000, bf16=False)
    return loop.train(cfg).last_checkpoint


def _heads_only(corpus: tuple[Path, Path], base: Path, out: Path, **changes: object) -> TrainConfig:
    run = {"preset": None, "init": str(base), "tokenizer": None, "num_heads": 3,
           "head_kind": "latent", "freeze": HEADS_ONLY, "grad_accum": 1, "warmup": 1,
           "lr": 1e-2, "save_every": 100, "spec_augment": False, "bf16": False}  # fmt: skip
    return _cfg(corpus, out, **{**run, **changes})


class _Counter:
    """Counts calls into the trunk: the encoder, the adapter and both decoder passes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        from speechllama.model.adapter import Adapter
        from speechllama.model.conformer import ConformerEncoder

        for cls, name in ((LlamaDecoder, "forward_train"), (LlamaDecoder, "forward_cached"),
                          (Adapter, "forward"), (ConformerEncoder, "forward")):  # fmt: skip
            monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name)))

    def _wrap(self, real):
        def counted(module, *args, **kwargs):
            self.calls += 1
            return real(module, *args, **kwargs)

        return counted


@pytest.mark.parametrize("kind", ["latent", "projection", "medusa"])
def test_cached_hidden_states_give_the_full_paths_loss_at_step_0(
    corpus: tuple[Path, Path], base: Path, tmp_path: Path, kind: str
) -> None:
    losses = {}
    for hidden in (True, False):
        torch.manual_seed(0)
        cfg = _heads_only(corpus, base, tmp_path / f"{kind}-{hidden}", head_kind=kind,
                          max_steps=3, hidden_cache=hidden,
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
        loop.train(cfg)
        events = [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").open()]
        start = next(e for e in events if e["event"] == "start")
        assert (start["hidden_cache"] is not None) == hidden
        losses[hidden] = [e["loss"] for e in events if e["event"] == "train"]
    # Step 0 (the loss of step 1's batch, before any update): the same function of the same
    # batch, up to the fp16 rounding of the cached hidden states.
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-3)
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)  # and so they stay close


def test_heads_only_training_never_runs_the_trunk_and_keeps_head_one(
    corpus: tuple[Path, Path], base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _Counter(monkeypatch)
    at_step: list[int] = []

    def recording(model, batch, **kwargs):
        assert batch.hidden
        at_step.append(counter.calls)
        return compute_loss(model, batch, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", recording)
    torch.manual_seed(0)
    result = loop.train(_heads_only(corpus, base, tmp_path / "run", max_steps=25))
    assert len(at_step) == 25
    assert at_step[0] > 0  # the caches were built by running the trunk ...
    assert set(at_step) == {at_step[0]} and counter.calls == at_step[0]  # ... and never again
    monkeypatch.undo()

    before, after = load_model(base), load_model(result.last_checkpoint)
    d = before.config.decoder.d_model
    new = after.model.state_dict()
    assert torch.equal(new["heads.proj.weight"], before.model.state_dict()["heads.proj.weight"])
    assert torch.equal(new["heads.maps"][:d], torch.eye(d))  # A_1 as expand_heads made it
    assert not torch.equal(new["heads.maps"][d:], torch.eye(d).repeat(2, 1))
    # Head 1 unchanged: greedy transcribes exactly as the base model; verify (exact) is greedy
    # and, with the trained heads, needs fewer decoder calls.
    audio = [u.audio_filepath for u in load_manifest(corpus[0])]
    old = before.transcribe(audio, DecodingOptions(strategy="greedy"))
    greedy = after.transcribe(audio, DecodingOptions(strategy="greedy"))
    verify = after.transcribe(audio, DecodingOptions(strategy="verify", verify="exact"))
    assert [r.tokens for r in greedy] == [r.tokens for r in old]
    assert [r.tokens for r in verify] == [r.tokens for r in greedy]
    assert len({t for r in greedy for t in r.tokens}) > 3  # real transcripts, not one token
    assert sum(r.decoder_calls for r in verify) < sum(r.decoder_calls for r in greedy)


def test_dev_metrics_on_cached_states_equal_the_full_paths(
    corpus: tuple[Path, Path], base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    cfg = _heads_only(corpus, base, tmp_path / "run", max_steps=4, eval_every=2,
                      dev_manifest=str(corpus[0]), cache_dir=str(tmp_path / "cache"))  # fmt: skip
    loop.train(cfg)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(len(e["dev_head_acc"]) == 3 for e in evals)
    acc = "/".join(f"{100 * a:.1f}" for a in evals[-1]["dev_head_acc"])
    line = dev_line(evals[-1])
    assert line.endswith(f" head acc {acc}%") and f"step 4: {line}" in capsys.readouterr().out
    # The dev loss and accuracies from cached states are the full model's on the same batches.
    trainer = loop.Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "again")))
    data = trainer.data
    assert data.dev_decode_batches is not None and all(b.hidden for b in data.dev_batches)
    assert [b.indices for b in data.dev_batches] == [b.indices for b in data.dev_decode_batches]
    common = {"ctc_weight": 0.0, "head_weights": (), "bf16": False, "max_utterances": 8}
    texts = data.dev_texts
    cached = validate(trainer.model, trainer.tokenizer, data.dev_batches, texts,
                      decode_batches=data.dev_decode_batches, **common)  # fmt: skip
    full = validate(trainer.model, trainer.tokenizer, data.dev_decode_batches, texts, **common)
    assert cached["dev_loss"] == pytest.approx(full["dev_loss"], rel=1e-3)
    assert cached["dev_head_acc"] == pytest.approx(full["dev_head_acc"], abs=0.02)
    assert cached["dev_wer"] == full["dev_wer"]
    # A second run over the same data reuses both caches; other decoder weights are another
    # fingerprint.
    assert data.hidden_stats["encoded"] == 0 and data.hidden.dir.name.startswith(HIDDEN_PREFIX)
    model = trainer.model
    fp = hidden_fingerprint(model, "enc", trainer.tokenizer)
    with torch.no_grad():
        model.decoder.norm.weight.add_(1e-3)
    assert hidden_fingerprint(model, "enc", trainer.tokenizer) != fp


def test_heads_only_run_resumes_to_the_same_weights(
    corpus: tuple[Path, Path], base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    straight = loop.train(_heads_only(corpus, base, tmp_path / "a", max_steps=4, save_every=2))
    _recording(monkeypatch, seen, stop_after=3)
    with pytest.raises(_Interrupt):
        loop.train(_heads_only(corpus, base, tmp_path / "b", max_steps=4, save_every=2))
    monkeypatch.undo()
    resumed = loop.train(
        _heads_only(corpus, base, tmp_path / "b", max_steps=4, save_every=2, resume=True)
    )
    a = load_model(straight.last_checkpoint).model.state_dict()
    b = load_model(resumed.last_checkpoint).model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_layer_heads_refuse_the_hidden_cache(corpus, base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no-hidden-cache"):
        loop.train(_heads_only(corpus, base, tmp_path / "a", head_kind="layer", max_steps=1))
    # Without the hidden cache the frozen trunk runs every step, which layer heads can use.
    result = loop.train(_heads_only(corpus, base, tmp_path / "b", head_kind="layer", max_steps=1,
                                    hidden_cache=False))  # fmt: skip
    assert result.steps == 1
    with pytest.raises(ValueError, match="nothing to train"):  # K = 1: its one head is frozen
        loop.train(_heads_only(corpus, base, tmp_path / "d", num_heads=None, head_kind=None))
    with pytest.raises(ValueError, match="CTC"):
        loop.train(_heads_only(corpus, base, tmp_path / "c", max_steps=1, ctc_weight=0.2))
