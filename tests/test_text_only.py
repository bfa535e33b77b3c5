"""Text-only LM batches (``--lm-text``): the corpus, the batch layout, the loss they add, and a
run that trains on them, resumes and replays them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from speechllama.checkpoint import load_checkpoint
from speechllama.cli import main
from speechllama.model.config import preset
from speechllama.model.encoder import build_encoder
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from speechllama.train import loop
from speechllama.train.config import TrainConfig
from speechllama.train.data import collate
from speechllama.train.losses import multi_token_loss
from speechllama.train.step import compute_loss
from speechllama.train.text_only import TextCorpus, text_logits
from tests.test_train import _cfg, _Interrupt, _recording, make_corpus

SENTENCES = ["red cat", "Blue dog!", "blue dog", "green tea", "open door", "big sun", "",
             "red sun", "hot tea", "wet map"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lm") / "lm.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(SENTENCES) + "\n")
    return path


def test_corpus_normalises_deduplicates_and_drops_excluded(
    corpus: tuple[Path, Path], lm_file: Path
) -> None:
    tok = Tokenizer.load(corpus[1])
    text = TextCorpus([lm_file], tok, exclude=["Green tea."])
    # "Blue dog!" and "blue dog" are one sentence; "" is nothing; "green tea" is the dev set's.
    assert len(text) == 7 and text.excluded == 1
    assert sorted(tok.decode(t[:-1]) for t in text.targets) == [
        "big sun", "blue dog", "hot tea", "open door", "red cat", "red sun", "wet map"]  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        TextCorpus([lm_file.parent / "missing.txt"], tok)
    with pytest.raises(ValueError, match="no usable sentences"):
        TextCorpus([lm_file], tok, max_tokens=1)


def test_batches_follow_the_training_layout_and_replay(
    corpus: tuple[Path, Path], lm_file: Path
) -> None:
    text = TextCorpus([lm_file], Tokenizer.load(corpus[1]))
    b = text.batch(3, seed=0, step=5, micro=1)
    assert b.tokens.shape == b.labels.shape and b.tokens.shape[0] == 3
    assert (b.tokens[:, 0] == BOS_ID).all()
    for row in range(3):
        n = int(b.label_lens[row])
        assert b.labels[row, n - 1] == EOS_ID and (b.labels[row, n:] == PAD_ID).all()
        assert torch.equal(b.tokens[row, 1:n], b.labels[row, : n - 1])  # shifted by one
    again = text.batch(3, seed=0, step=5, micro=1)
    assert torch.equal(b.tokens, again.tokens)  # what a resumed run needs
    others = [text.batch(3, seed=0, step=s, micro=1).tokens for s in range(6, 12)]
    assert any(o.shape != b.tokens.shape or not torch.equal(o, b.tokens) for o in others)
    assert text.batch(10, seed=0, step=0).tokens.shape[0] == len(text)  # capped, no repeats


def _model() -> SpeechLLaMA:
    cfg = preset("tiny", vocab_size=24)
    torch.manual_seed(0)
    return SpeechLLaMA(cfg, build_encoder(cfg.encoder)).eval()  # no dropout: exact sums


def test_text_logits_equal_the_decoder_without_audio(
    corpus: tuple[Path, Path], lm_file: Path
) -> None:
    model = _model()
    b = TextCorpus([lm_file], Tokenizer.load(corpus[1])).batch(4, seed=1, step=0)
    logits = text_logits(model, b)
    assert logits.shape[:3] == (*b.tokens.shape, model.config.heads.num_heads)
    # Row by row, unpadded: padding after a row must not change its logits.
    for row in range(4):
        n = int(b.label_lens[row])
        alone = text_logits(model, type(b)(b.tokens[row : row + 1, :n], b.labels[row : row + 1,
                                           :n], b.label_lens[row : row + 1]))  # fmt: skip
        torch.testing.assert_close(alone[0], logits[row, :n], rtol=1e-4, atol=1e-5)


def test_compute_loss_adds_the_weighted_text_loss(corpus: tuple[Path, Path], lm_file: Path) -> None:
    model = _model()
    tok = Tokenizer.load(corpus[1])
    text = TextCorpus([lm_file], tok).batch(4, seed=0, step=0)
    feats = torch.randn(2, 60, model.config.encoder.n_mels)
    examples = [
        {"inputs": feats[i], "target": [*tok.encode(s), EOS_ID], "duration": 1.0, "index": i}
        for i, s in enumerate(["red cat", "open door"])
    ]
    batch = collate(examples)
    speech = compute_loss(model, batch, ctc_weight=0.0)
    both = compute_loss(model, batch, ctc_weight=0.0, text=text, text_weight=0.25)
    lm = multi_token_loss(text_logits(model, text), text.labels, text.label_lens).total
    assert both.text_ce == pytest.approx(float(lm.detach()), rel=1e-5) and speech.text_ce == 0.0
    expected = float(speech.total.detach()) + 0.25 * float(lm.detach())
    assert float(both.total.detach()) == pytest.approx(expected, rel=1e-5)
    assert both.ce == pytest.approx(speech.ce, rel=1e-6)  # the speech CE stays the speech CE


def test_config_checks() -> None:
    base = {"train_manifest": "t.jsonl", "out_dir": "o", "lm_text": ("lm.txt",)}
    with pytest.raises(ValueError, match="lm-weight"):
        TrainConfig(**base, lm_weight=0.0)
    with pytest.raises(ValueError, match="lm-batch-size"):
        TrainConfig(**base, lm_batch_size=0)
    with pytest.raises(ValueError, match="--mwer"):
        TrainConfig(**{**base, "preset": None}, init="ckpt", mwer=True)
    cfg = TrainConfig(**base)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_training_with_text_logs_it_and_resumes(
    corpus: tuple[Path, Path], lm_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = {"lm_text": (str(lm_file),), "lm_batch_size": 3, "dev_manifest": str(corpus[0])}
    torch.manual_seed(0)
    straight = loop.train(_cfg(corpus, tmp_path / "a", eval_every=100, **lm))
    events = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").open()]
    start = next(e for e in events if e["event"] == "start")
    # The dev set is the training manifest here: its 5 sentences in lm.txt are all dropped.
    assert start["lm_sentences"] == 3 and start["lm_excluded"] == 5
    trains = [e for e in events if e["event"] == "train"]
    assert len(trains) == 6 and all(e["text_ce"] > 0 for e in trains)
    # Stopped in step 4, after the step-3 checkpoint, and resumed: the same text batches, so
    # the same weights.
    torch.manual_seed(0)
    _recording(monkeypatch, [], stop_after=7)
    with pytest.raises(_Interrupt):
        loop.train(_cfg(corpus, tmp_path / "b", eval_every=100, **lm))
    monkeypatch.undo()
    resumed = loop.train(_cfg(corpus, tmp_path / "b", resume=True, eval_every=100, **lm))
    a, _, doc = load_checkpoint(straight.last_checkpoint)
    b, _, _ = load_checkpoint(resumed.last_checkpoint)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert doc["training"]["train_config"]["lm_text"] == [str(lm_file)]
    with pytest.raises(ValueError, match="changed"):
        loop.train(_cfg(corpus, tmp_path / "b", resume=True, **{**lm, "lm_weight": 0.5}))


def test_cli_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig) -> None:
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(loop, "train", fake_train)
    args = ["train", "--train", "t.jsonl", "--out", str(tmp_path), "--preset", "tiny",
            "--lm-text", "a.txt", "b.txt.gz", "--lm-batch-size", "8",
            "--lm-weight", "0.1"]  # fmt: skip
    with pytest.raises(_Stop):
        main(args)
    assert seen[0].lm_text == ("a.txt", "b.txt.gz")
    assert (seen[0].lm_batch_size, seen[0].lm_weight) == (8, 0.1)


class _Stop(Exception):
    def __init__(self) -> None:
        super().__init__("stop")
