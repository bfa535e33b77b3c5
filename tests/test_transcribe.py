"""The Python API: load_model + transcribe on files and arrays, batching invariance, input
order, per-file errors, timing split, and the bundled-model lookup.

Also home of the small helpers the CLI and evaluation tests share (a random ``tiny`` checkpoint
with a tokenizer trained here, and synthetic wav files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllama import DecodingResult, load_model
from speechllama.audio import AudioError, load_audio
from speechllama.checkpoint import save_checkpoint
from speechllama.model.config import preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import train_tokenizer
from speechllama.transcribe import Transcriber, resolve_model_dir

torch.set_num_threads(1)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the early bird catches the worm",
    "actions speak louder than words",
    "better late than never",
    "every cloud has a silver lining",
]


def make_checkpoint(root: Path, seed: int = 0) -> Path:
    """A randomly initialised ``tiny`` model and a tokenizer trained on a few sentences."""
    tok = train_tokenizer(SENTENCES, root / "tok" / "tokenizer.model", vocab_size=40)
    torch.manual_seed(seed)
    model = SpeechLLaMA(preset("tiny", tok.vocab_size)).eval()
    return save_checkpoint(model, tok, root / "ckpt", meta={"note": "random weights for tests"})


def write_wav(path: Path, seconds: float, seed: int = 0) -> Path:
    """A float32 16 kHz wav of a few tones plus noise (stored exactly, so arrays compare)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    freqs = rng.uniform(150, 3000, size=3)
    wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 6 + 0.05 * rng.standard_normal(t.size)
    sf.write(path, wave.astype(np.float32), 16000, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(ckpt) -> Transcriber:
    return load_model(ckpt)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("wavs")
    durations = [0.9, 0.35, 1.4, 0.6, 1.1]
    return [write_wav(root / f"u{i}.wav", d, seed=i) for i, d in enumerate(durations)]


def test_single_file(model, wavs):
    r = model.transcribe(wavs[0])
    assert isinstance(r, DecodingResult)
    assert r.error is None
    assert r.audio_filepath == str(wavs[0])
    assert r.text == model.tokenizer.decode(list(r.tokens))
    assert r.audio_seconds == pytest.approx(0.9)
    assert r.decoder_calls >= 1
    assert sum(i * n for i, n in enumerate(r.accepted_per_call)) == len(r.tokens)
    assert r.encoder_seconds > 0 and r.decoder_seconds > 0
    # never longer than the limit for 0.9 s: 16 + ceil(0.9 * 12) tokens
    assert len(r.tokens) <= 16 + 11


def test_batches_give_the_same_tokens_in_input_order(model, wavs):
    alone = [model.transcribe(w) for w in wavs]
    batched = model.transcribe(wavs, batch_size=3)
    assert [r.audio_filepath for r in batched] == [str(w) for w in wavs]
    for a, b in zip(alone, batched, strict=True):
        assert a.tokens == b.tokens
        assert a.decoder_calls == b.decoder_calls
    assert len({len(r.tokens) for r in batched}) > 1 or len({r.tokens for r in batched}) > 1


def test_array_input_equals_file_input(model, wavs):
    wave = load_audio(wavs[1])
    from_array = model.transcribe(wave)
    assert from_array.audio_filepath is None
    assert from_array.tokens == model.transcribe(wavs[1]).tokens


def test_bad_files_in_a_list_become_errors_and_the_rest_is_transcribed(model, wavs, tmp_path):
    missing = tmp_path / "missing.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    inputs = [wavs[0], missing, empty, wavs[1], text]
    out = model.transcribe(inputs)
    assert [r.audio_filepath for r in out] == [str(p) for p in inputs]
    for bad in (missing, empty, text):
        r = out[inputs.index(bad)]
        assert r.error is not None and str(bad) in r.error and "\n" not in r.error
        assert r.tokens == () and r.decoder_calls == 0
    assert out[0].error is None and out[0].tokens == model.transcribe(wavs[0]).tokens
    assert out[3].error is None
    with pytest.raises(AudioError, match=r"missing\.wav"):
        model.transcribe(missing)


def test_too_short_audio_fails_alone(model, wavs):
    blip = np.zeros(100, dtype=np.float32)  # under one 25 ms analysis window
    out = model.transcribe([wavs[1], blip, wavs[3]], batch_size=3)
    assert out[1].error == "audio array: too short (6 ms) for one frame"
    assert out[0].tokens == model.transcribe(wavs[1]).tokens and out[2].error is None


def test_encoder_time_is_split_by_duration(model, wavs):
    out = model.transcribe(wavs[:3], batch_size=3)
    per_second = [r.encoder_seconds / r.audio_seconds for r in out]
    assert per_second == pytest.approx([per_second[0]] * 3)
    assert all(r.rtf == pytest.approx((r.encoder_seconds + r.decoder_seconds) / r.audio_seconds)
               for r in out)  # fmt: skip


def test_training_mode_is_restored(model, wavs):
    model.model.train()
    try:
        model.transcribe(wavs[1])
        assert model.model.training
    finally:
        model.model.eval()


def test_option_overrides_and_unknown_options(model, wavs):
    r = model.transcribe(wavs[1], max_tokens_per_second=0.0, max_tokens_min=2)
    assert len(r.tokens) <= 2
    with pytest.raises(TypeError):
        model.transcribe(wavs[1], no_such_option=1)


def test_default_model_lookup(monkeypatch, tmp_path, ckpt):
    import speechllama.transcribe as tr

    monkeypatch.setattr(tr, "BUNDLED_MODELS", tmp_path / "models")
    with pytest.raises(FileNotFoundError, match=r"no default model.*speechllama train"):
        load_model()
    with pytest.raises(FileNotFoundError, match="nope: no such model"):
        resolve_model_dir("nope")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "default").symlink_to(ckpt)
    assert resolve_model_dir(None) == tmp_path / "models" / "default"
    assert resolve_model_dir("default") == tmp_path / "models" / "default"
    assert load_model().tokenizer.vocab_size == load_model(ckpt).tokenizer.vocab_size
