"""Training: loss masking and head shifting, CTC, the LR schedule, resumption, the encoder
cache, the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from speechllama.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from speechllama.cli import main
from speechllama.cli.train import parse_augment
from speechllama.data.manifest import load_manifest
from speechllama.features import compute_features
from speechllama.model.config import preset
from speechllama.model.encoder import build_encoder
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import Tokenizer, train_tokenizer
from speechllama.train import loop
from speechllama.train.cache import EncoderCache, fingerprint
from speechllama.train.config import TrainConfig
from speechllama.train.data import load_wave
from speechllama.train.losses import (
    IGNORE,
    ctc_loss,
    head_accuracy_counts,
    head_targets,
    multi_token_loss,
)
from speechllama.train.schedule import build_scheduler, warmup_cosine

# --- losses -------------------------------------------------------------------------------------


def test_head_targets_shift_by_head_and_stop_at_eos() -> None:
    # Two utterances: y = (5, 6) and y = (7,), EOS = 2, pad = 0; labels = y EOS.
    labels = torch.tensor([[5, 6, 2], [7, 2, 0]])
    lens = torch.tensor([3, 2])
    t = head_targets(labels, lens, num_heads=3)
    assert t.shape == (2, 3, 3)
    i = IGNORE
    assert t[0].tolist() == [[5, 6, 2], [6, 2, i], [2, i, i]]
    assert t[1].tolist() == [[7, 2, i], [2, i, i], [i, i, i]]


def test_multi_token_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([[5, 6, 2], [7, 2, 0]])
    lens = torch.tensor([3, 2])
    logits = torch.randn(2, 3, 2, 9)
    out = multi_token_loss(logits, labels, lens, weights=(1.0, 0.5))

    def ce(b: int, u: int, k: int, target: int) -> float:
        return float(F.cross_entropy(logits[b, u, k][None], torch.tensor([target])))

    head0 = [ce(0, 0, 0, 5), ce(0, 1, 0, 6), ce(0, 2, 0, 2), ce(1, 0, 0, 7), ce(1, 1, 0, 2)]
    head1 = [ce(0, 0, 1, 6), ce(0, 1, 1, 2), ce(1, 0, 1, 2)]
    m0, m1 = sum(head0) / 5, sum(head1) / 3
    assert out.tokens.tolist() == [5, 3]
    assert out.per_head.tolist() == pytest.approx([m0, m1], rel=1e-5)
    assert float(out.total) == pytest.approx(m0 + 0.5 * m1, rel=1e-5)


def test_positions_beyond_eos_do_not_contribute() -> None:
    torch.manual_seed(1)
    labels = torch.tensor([[5, 6, 2, 0, 0]])
    lens = torch.tensor([3])
    logits = torch.randn(1, 5, 2, 9, requires_grad=True)
    loss = multi_token_loss(logits, labels, lens).total
    loss.backward()
    grad = logits.grad[0]
    # Head 0 scores positions 0..2, head 1 positions 0..1; nothing else gets gradient.
    assert grad[3:].abs().sum() == 0
    assert grad[2, 1].abs().sum() == 0
    assert grad[2, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0
    # Garbage in masked positions leaves the loss unchanged.
    noisy = logits.detach().clone()
    noisy[0, 3:] = 1e4 * torch.randn_like(noisy[0, 3:])
    noisy[0, 2, 1] = 1e4
    assert float(multi_token_loss(noisy, labels, lens).total) == pytest.approx(loss.item())


def test_head_accuracy_scores_exactly_the_loss_positions() -> None:
    # y = (5, 6) and y = (7,), EOS = 2, pad = 0. Head 0 targets: row 0 -> 5 6 2, row 1 -> 7 2;
    # head 1 targets: row 0 -> 6 2 (position 2 has none), row 1 -> 2 (positions 1, 2 none).
    labels = torch.tensor([[5, 6, 2], [7, 2, 0]])
    lens = torch.tensor([3, 2])
    logits = torch.zeros(2, 3, 2, 9)

    def pick(b: int, u: int, k: int, token: int) -> None:
        logits[b, u, k, token] = 1.0

    pick(0, 0, 0, 5), pick(0, 1, 0, 4), pick(0, 2, 0, 2)  # head 0 row 0: right, wrong, right
    pick(1, 0, 0, 8), pick(1, 1, 0, 2)  # head 0 row 1: wrong, right (EOS counts)
    pick(0, 0, 1, 6), pick(0, 1, 1, 6), pick(1, 0, 1, 2)  # head 1: right, wrong, right
    # Traps on positions without a target: a hit there must not count.
    pick(0, 2, 1, 2)  # head 1 past the end predicting EOS again
    pick(1, 2, 0, 0)  # head 0 on padding predicting the pad id the labels hold there
    pick(1, 1, 1, 0)
    correct, scored = head_accuracy_counts(logits, labels, lens)
    assert scored.tolist() == [5, 3]  # the counts multi_token_loss averages over
    assert scored.tolist() == multi_token_loss(logits, labels, lens).tokens.tolist()
    assert correct.tolist() == [3, 2]


def test_single_head_equals_plain_cross_entropy_and_bf16_upcast() -> None:
    torch.manual_seed(2)
    labels = torch.tensor([[4, 3, 2, 0], [8, 7, 6, 2]])
    lens = torch.tensor([3, 4])
    logits = torch.randn(2, 4, 1, 10)
    ref = F.cross_entropy(
        logits[:, :, 0].reshape(-1, 10), labels.masked_fill(labels == 0, -100).reshape(-1)
    )
    out = multi_token_loss(logits, labels, lens)
    assert float(out.total) == pytest.approx(float(ref), rel=1e-6)
    low = multi_token_loss(logits.bfloat16(), labels, lens)
    assert low.total.dtype == torch.float32
    with pytest.raises(ValueError, match="weights"):
        multi_token_loss(logits, labels, lens, weights=(1.0, 1.0))


def test_ctc_loss_matches_torch_and_survives_impossible_alignment() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 5)
    lens = torch.tensor([6, 4])
    targets = torch.tensor([[1, 2, 3], [4, 0, 0]])
    tlens = torch.tensor([3, 1])
    ref = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, lens, tlens, blank=0)
    assert float(ctc_loss(logits, lens, targets, tlens)) == pytest.approx(float(ref), rel=1e-5)
    # Four tokens cannot align to two frames: that utterance drops out instead of inf.
    bad = ctc_loss(
        logits,
        torch.tensor([2, 4]),
        torch.tensor([[1, 2, 3, 4], [4, 0, 0, 0]]),
        torch.tensor([4, 1]),
    )
    assert math.isfinite(float(bad))


# --- schedule -----------------------------------------------------------------------------------


def test_warmup_cosine_shape() -> None:
    values = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(130)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)  # peak at the end of warmup
    assert all(a < b for a, b in itertools.pairwise(values[:10]))  # rising
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))  # then falling
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert values[110] == pytest.approx(0.1) and values[129] == pytest.approx(0.1)  # floor


def test_scheduler_drives_optimizer_and_restores() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    opt2 = torch.optim.AdamW([p], lr=2.0)
    sched2 = build_scheduler(opt2, warmup_steps=4, total_steps=20)
    opt2.load_state_dict(opt.state_dict())  # the current lr travels with the optimizer
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * warmup_cosine(7, 4, 20))


# --- the loop: resumption, the encoder cache ----------------------------------------------------

WORDS = [
    "red cat",
    "blue dog",
    "green tea",
    "open door",
    "big sun",
    "small map",
    "hot pan",
    "wet fog",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def make_corpus(root: Path) -> tuple[Path, Path]:
    """Eight short tone clips with two-word transcripts, a manifest and a tokenizer."""
    rows = []
    for i, text in enumerate(WORDS):
        seconds = 0.4 + 0.08 * i
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t).astype(np.float32)
        path = root / f"u{i}.wav"
        sf.write(path, wave, 16000)
        rows.append({"audio_filepath": str(path), "text": text, "duration": seconds})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = root / "tokenizer.model"
    train_tokenizer(WORDS * 3, tok, vocab_size=24)
    return manifest, tok


def _cfg(corpus: tuple[Path, Path], out: Path, **changes: object) -> TrainConfig:
    manifest, tok = corpus
    base = {
        "train_manifest": str(manifest),
        "out_dir": str(out),
        "tokenizer": str(tok),
        "preset": "tiny",
        "max_steps": 6,
        "max_duration": 1.6,
        "num_buckets": 2,
        "grad_accum": 2,
        "warmup": 2,
        "save_every": 3,
        "keep_last": 5,
        "log_every": 1,
        "progress": False,
        "threads": 1,
    }
    return TrainConfig(**{**base, **changes})


class _Interrupt(Exception):
    pass


def _recording(monkeypatch: pytest.MonkeyPatch, seen: list[list[int]], stop_after: int = 0):
    from speechllama.train.step import compute_loss as real

    def wrapped(model, batch, **kwargs):
        if stop_after and len(seen) == stop_after:
            raise _Interrupt
        seen.append(list(batch.indices))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", wrapped)


def test_resume_replays_the_same_batches_and_weights(
    corpus: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    straight: list[list[int]] = []
    _recording(monkeypatch, straight)
    augment = {"noise_prob": 1.0}  # waveform augmentation must replay too
    result = loop.train(_cfg(corpus, tmp_path / "a", augment=augment))
    assert result.steps == 6 and len(straight) == 12  # 2 micro-batches per step
    assert result.epochs_done > 1  # the run crossed an epoch boundary
    # Interrupt a second run in step 4 (micro-batch 7), after the step-3 checkpoint.
    first: list[list[int]] = []
    _recording(monkeypatch, first, stop_after=7)
    with pytest.raises(_Interrupt):
        loop.train(_cfg(corpus, tmp_path / "b", augment=augment))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000003"]
    second: list[list[int]] = []
    _recording(monkeypatch, second)
    resumed = loop.train(_cfg(corpus, tmp_path / "b", augment=augment, resume=True))
    assert first[:6] + second == straight
    # Same batches, optimizer state and RNG: the same weights, bit for bit.
    a, _, _ = load_checkpoint(result.last_checkpoint)
    b, _, doc = load_checkpoint(resumed.last_checkpoint)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert doc["training"]["steps"] == 6 and doc["training"]["git_commit"] != ""
    events = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    starts = [e for e in events if e["event"] == "start"]
    assert starts[-1]["resumed_from"].endswith("step-00000003")
    assert [e["step"] for e in events if e["event"] == "train"][-3:] == [4, 5, 6]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        loop.train(_cfg(corpus, tmp_path / "b", augment=augment))  # would overwrite the run
    with pytest.raises(ValueError, match="changed"):
        loop.train(_cfg(corpus, tmp_path / "b", augment=augment, resume=True, lr=0.5))


def test_frozen_encoder_outputs_are_cached_once(
    corpus: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = Tokenizer.load(corpus[1])
    torch.manual_seed(0)
    cfg = preset("tiny", tokenizer.vocab_size)
    frozen = SpeechLLaMA(cfg.replace(encoder=dataclasses.replace(cfg.encoder, frozen=True)))
    init = save_checkpoint(frozen, tokenizer, tmp_path / "init")
    before = {k: v.clone() for k, v in frozen.encoder.state_dict().items()}
    calls = []
    real_forward = type(frozen.encoder).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(frozen.encoder), "forward", counting)
    run = _cfg(corpus, tmp_path / "run", preset=None, init=str(init), tokenizer=None,
               max_steps=4, save_every=100, augment={}, cache_copies=2)  # fmt: skip
    result = loop.train(run)
    encoder_calls = len(calls)
    # The cache build only (8 clean + 8 augmented copies); training never runs the encoder.
    assert 1 <= encoder_calls <= 16
    shards = list((tmp_path / "run" / "encoder_cache").rglob("shard-*.safetensors"))
    assert shards
    trained, _, _ = load_checkpoint(result.last_checkpoint)
    for name, value in trained.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name  # frozen: untouched
    # A second run over the same data reuses the cache: no encoder call at all.
    loop.train(dataclasses.replace(run, out_dir=str(tmp_path / "run2"),
                                   cache_dir=str(tmp_path / "run" / "encoder_cache")))  # fmt: skip
    assert len(calls) == encoder_calls


def test_encoder_cache_matches_the_encoder_and_keeps_augmented_copies(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, _ = corpus
    utts = load_manifest(manifest)[:3]
    torch.manual_seed(0)
    enc = build_encoder(dataclasses.replace(preset("tiny", 24).encoder, frozen=True))
    cache = EncoderCache(tmp_path, fingerprint(enc, {"f": "fbank"}), copies=2)

    def louder(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return wave + 0.05 * rng.standard_normal(wave.shape).astype(np.float32)

    with pytest.raises(ValueError, match="augmentation"):
        cache.build(utts, enc, feature_kind="fbank", n_mels=80, progress=False)
    added = cache.build(utts, enc, feature_kind="fbank", n_mels=80, augment=louder, shard_size=4,
                        batch_seconds=0.5, progress=False)  # fmt: skip
    assert added == 6 and not cache.missing(utts)
    reopened = EncoderCache(tmp_path, fingerprint(enc, {"f": "fbank"}), copies=2)
    assert len(reopened) == 6 and len(list(reopened.dir.glob("shard-*"))) == 2
    for utt in utts:
        feats = compute_features(load_wave(utt), "fbank", 80)[None]
        with torch.no_grad():
            ref, n = enc(feats, torch.tensor([feats.shape[1]]))
        got = reopened.get(utt, 0)
        assert got.dtype == torch.float16 and got.shape == ref[0, : int(n[0])].shape
        assert torch.allclose(got.float(), ref[0, : int(n[0])], atol=2e-2, rtol=1e-2)
        assert not torch.allclose(reopened.get(utt, 1).float(), got.float(), atol=1e-3)
    # Another encoder (or feature config) is another fingerprint: nothing is reused.
    other = build_encoder(dataclasses.replace(preset("tiny", 24).encoder, frozen=True))
    assert fingerprint(other, {"f": "fbank"}) != fingerprint(enc, {"f": "fbank"})
    assert fingerprint(enc, {"f": "whisper"}) != fingerprint(enc, {"f": "fbank"})


def test_validate_reports_each_heads_accuracy_on_the_loss_positions(
    corpus: tuple[Path, Path],
) -> None:
    from speechllama.model.config import HeadsConfig
    from speechllama.train.data import SpeechDataset, collate
    from speechllama.train.step import compute_loss
    from speechllama.train.validate import validate

    tok = Tokenizer.load(corpus[1])
    torch.manual_seed(0)
    cfg = preset("tiny", tok.vocab_size).replace(heads=HeadsConfig(kind="latent", num_heads=3))
    model = SpeechLLaMA(cfg)
    utts = load_manifest(corpus[0])
    data = SpeechDataset(utts, tok)
    batches = [collate([data[i] for i in rows]) for rows in ([0, 1, 2], [3, 4, 5, 6, 7])]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):  # a little training, so that the accuracies are not all 0
        for batch in batches:
            opt.zero_grad()
            compute_loss(model, batch).total.backward()
            opt.step()
    texts = [u.text for u in utts]
    out = validate(model, tok, batches, texts, ctc_weight=0.0, head_weights=(), bf16=False,
                   max_utterances=2)  # fmt: skip
    hits, scored = [0] * 3, [0] * 3
    model.eval()
    for i in range(len(utts)):  # one utterance at a time, position by position
        one = collate([data[i]])
        with torch.no_grad():
            emb, lens = model.encode(one.inputs, one.input_lens)
            logits = model(emb, lens, one.tokens, one.label_lens)
        target = data.targets[i]  # y EOS
        for u, k in itertools.product(range(len(target)), range(3)):
            if u + k < len(target):
                scored[k] += 1
                hits[k] += int(logits[0, u, k].argmax()) == target[u + k]
    expected = [h / n for h, n in zip(hits, scored, strict=True)]
    assert out["dev_head_acc"] == pytest.approx(expected)
    assert len(set(expected)) == 3 and min(expected) > 0, expected  # non-trivial
    assert out["dev_utterances"] == 2 and len(out["examples"]) == 2


def test_cli_parses_augment_and_refuses_heads_with_init() -> None:
    assert parse_augment(None) is None
    assert parse_augment([]) == {}
    assert parse_augment(["speed=[0.9, 1.1]", "noise-snr=20", "kind=babble"]) == {
        "speed": [0.9, 1.1],
        "noise_snr": 20,
        "kind": "babble",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_augment(["speed"])


def test_init_expands_heads_and_freeze_trains_only_the_heads(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    tokenizer = Tokenizer.load(corpus[1])
    torch.manual_seed(0)
    base = SpeechLLaMA(preset("tiny", tokenizer.vocab_size).replace(
        decoder=dataclasses.replace(preset("tiny", 1).decoder, vocab_size=tokenizer.vocab_size,
                                    tie_embeddings=False)))  # fmt: skip
    init = save_checkpoint(base, tokenizer, tmp_path / "init")
    code = main([
        "train", "--train", str(corpus[0]), "--init", str(init), "--out", str(tmp_path / "o"),
        "--heads", "3", "--head-kind", "latent", "--head-loss-weights", "1", "0.5", "0.25",
        "--freeze", "encoder", "adapter", "decoder", "--max-steps", "2", "--max-duration", "3",
        "--warmup", "1", "--lr", "1e-2", "--threads", "1", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    trained, _, doc = load_checkpoint(tmp_path / "o" / "step-00000002")
    heads = trained.config.heads
    assert (heads.kind, heads.num_heads, heads.loss_weights) == ("latent", 3, (1.0, 0.5, 0.25))
    assert doc["training"]["train_config"]["freeze"] == ["encoder", "adapter", "decoder"]
    old = base.state_dict()
    new = trained.state_dict()
    for name in old:
        if name.split(".")[0] in ("encoder", "adapter", "decoder"):
            assert torch.equal(old[name], new[name]), name
    # Heads 2 and 3 trained (their latent maps left the identity); head 1 (the shared output
    # layer, seeded from the base model's, and A_1) is frozen in heads-only training.
    d = base.config.decoder.d_model
    assert not torch.equal(new["heads.maps"][d:], torch.eye(d).repeat(2, 1))
    assert torch.equal(new["heads.maps"][:d], torch.eye(d))
    assert torch.equal(new["heads.proj.weight"], old["heads.proj.weight"])
    assert doc["training"]["train_config"]["train_head_one"] is None
    # --train-head-one: head 1 trains with the others.
    code = main([
        "train", "--train", str(corpus[0]), "--init", str(init), "--out", str(tmp_path / "h1"),
        "--heads", "3", "--head-kind", "latent", "--freeze", "encoder", "adapter", "decoder",
        "--train-head-one", "--max-steps", "2", "--max-duration", "3", "--warmup", "1",
        "--lr", "1e-2", "--threads", "1", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    again = load_checkpoint(tmp_path / "h1" / "step-00000002")[0].state_dict()
    assert not torch.equal(again["heads.proj.weight"], old["heads.proj.weight"])
    assert not torch.equal(again["heads.maps"][:d], torch.eye(d))


def test_dataset_augmentation_is_a_function_of_seed_epoch_and_index(
    corpus: tuple[Path, Path],
) -> None:
    from speechllama.data.augment import AugmentConfig, Augmenter
    from speechllama.train.data import SpeechDataset, collate

    utts = load_manifest(corpus[0])
    tok = Tokenizer.load(corpus[1])
    aug = Augmenter(AugmentConfig(noise_prob=1.0, speed_prob=0.0), seed=0)
    a, b = (SpeechDataset(utts, tok, augment=aug, seed=3) for _ in range(2))
    clean = SpeechDataset(utts, tok)
    assert torch.equal(a[2]["inputs"], b[2]["inputs"])
    assert not torch.equal(a[2]["inputs"], clean[2]["inputs"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["inputs"], b[2]["inputs"])
    batch = collate([clean[0], clean[3]])
    y0 = tok.encode("red cat")
    assert batch.tokens[0, : len(y0) + 1].tolist() == [1, *y0]
    assert batch.labels[0, : len(y0) + 1].tolist() == [*y0, 2]
    assert batch.label_lens[0] == len(y0) + 1 and batch.ctc_lens[0] == len(y0)
    assert batch.inputs.shape[0] == 2 and batch.input_lens.max() == batch.inputs.shape[1]


def test_utterances_that_cannot_fit_are_skipped_up_front(corpus: tuple[Path, Path]) -> None:
    from types import SimpleNamespace

    from speechllama.train.setup import embeddings_for, fitting

    tok = Tokenizer.load(corpus[1])
    tiny = preset("tiny", tok.vocab_size)
    # fbank: 100 frames/s, conformer /4, adapter stack 2 -> 12.5 embeddings per second.
    assert embeddings_for(10.0, tiny) == 125
    utt = lambda d, text="red cat": SimpleNamespace(duration=d, text=text)  # noqa: E731
    kept, skipped = fitting([utt(0.05), utt(2.0), utt(90.0), utt(2.0, "red " * 2000)], tok, tiny)
    assert [u.duration for u in kept] == [2.0]
    assert skipped == {"too_short": 1, "too_long": 2}
    whisper = preset("small", tok.vocab_size)
    kept, skipped = fitting([utt(29.0), utt(31.0)], tok, whisper)
    assert [u.duration for u in kept] == [29.0] and skipped["too_long"] == 1
    # Speed perturbation down to 0.9 may stretch 29 s past Whisper's 30 s window.
    assert fitting([utt(29.0)], tok, whisper, stretch=1 / 0.9)[0] == []
