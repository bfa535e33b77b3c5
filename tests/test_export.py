"""The bundled default model: ``speechllama export`` writes an fp16 shipping copy (trained parts
only, no CTC head, no training state) that ``load_model()`` finds without ``--model``; the
one-line error when none is bundled; package-data that puts it in the wheel; the 25 MB guard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_transcribe import SENTENCES, write_wav

from speechllama import load_model
from speechllama.checkpoint import read_checkpoint_config, save_checkpoint
from speechllama.cli import main
from speechllama.export import MAX_BUNDLED_MB, ExportError, dir_megabytes, export_model
from speechllama.model.config import preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import train_tokenizer
from speechllama.transcribe import BUNDLED_MODELS

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A random ``tiny`` model with a CTC head and saved training state, like a training run's."""
    root = tmp_path_factory.mktemp("export")
    tok = train_tokenizer(SENTENCES, root / "tok.model", vocab_size=40)
    torch.manual_seed(0)
    config = preset("tiny", tok.vocab_size)
    model = SpeechLLaMA(type(config).from_dict({**config.to_dict(), "ctc": True})).eval()
    state = {"step": 7, "moments": torch.ones(3)}
    return save_checkpoint(model, tok, root / "ckpt", meta={"steps": 7}, train_state=state)


def test_export_is_fp16_without_ctc_or_state_and_decodes_alike(trained, tmp_path):
    out = export_model(trained, tmp_path / "default")
    doc = read_checkpoint_config(out)
    assert doc["weights"]["dtype"] == "float16" and doc["model"]["ctc"] is False
    assert doc["training"]["steps"] == 7 and doc["training"]["export"]["dtype"] == "float16"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    src_mb = (trained / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.55 * src_mb  # fp16 and no CTC head
    wav = write_wav(tmp_path / "a.wav", 0.8)
    # fp32 encoders: the fp16 export is what is compared, not the bf16 encoder's rounding
    ours = load_model(out, encoder_precision="float32")
    theirs = load_model(trained, encoder_precision="float32")
    assert ours.model.ctc_head is None
    for name, p in ours.model.state_dict().items():
        assert torch.allclose(p, theirs.model.state_dict()[name], atol=1e-3, rtol=1e-3), name
    a = ours.transcribe(wav, max_tokens_per_second=4)
    b = theirs.transcribe(wav, max_tokens_per_second=4)
    assert a.tokens == b.tokens


def test_export_keeps_ctc_on_request_and_refuses_oversize(trained, tmp_path):
    out = export_model(trained, tmp_path / "k", keep_ctc=True)
    assert read_checkpoint_config(out)["model"]["ctc"] is True
    too_big = r"ckpt: its float16 weights take .* more than the 0\.01 MB"
    with pytest.raises(ExportError, match=too_big):
        export_model(trained, tmp_path / "small", max_mb=0.01)
    assert not (tmp_path / "small").exists()  # refused before writing


def test_cli_exports_and_load_model_finds_the_bundled_default(
    trained, tmp_path, monkeypatch, capsys
):
    import speechllama.transcribe as tr

    monkeypatch.setattr(tr, "BUNDLED_MODELS", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder named default here must not be taken for it
    with pytest.raises(FileNotFoundError, match=r"^no bundled model in this install; pass --model"):
        load_model()
    assert main(["transcribe", str(write_wav(tmp_path / "a.wav", 0.5))]) == 1
    assert "no bundled model in this install; pass --model DIR" in capsys.readouterr().err
    assert main(["export", str(trained)]) == 0
    assert "models/default" in capsys.readouterr().out
    assert load_model().tokenizer.vocab_size == load_model(trained).tokenizer.vocab_size


def test_package_data_ships_the_bundled_models_folder():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "models/**/*" in setuptools["package-data"]["speechllama"]
    assert BUNDLED_MODELS == ROOT / "speechllama" / "models"  # what that pattern covers


def test_bundled_model_fits_the_size_limit():
    """The guard on what ships: the bundled model, when there is one, stays small and loadable
    from its config (the trained parts only, encoder from its package)."""
    bundled = BUNDLED_MODELS / "default"
    if not bundled.is_dir():
        pytest.skip("no bundled model in this checkout yet")
    assert dir_megabytes(bundled) <= MAX_BUNDLED_MB
    doc = json.loads((bundled / "config.json").read_text())
    assert doc["weights"]["encoder"] == "source"
    assert not (bundled / "train_state.json").exists()


def test_bundled_model_transcribes_the_examples_and_verify_equals_greedy():
    """What the README's first command does: the shipped model (fp16 storage, fp32 compute)
    transcribes the bundled clips, and exact verification reproduces greedy token for token
    with no more decoder calls."""
    bundled = BUNDLED_MODELS / "default"
    if not bundled.is_dir():
        pytest.skip("no bundled model in this checkout yet")
    from speechllama.assets import example_manifest
    from speechllama.decoding.options import DecodingOptions

    rows = [json.loads(line) for line in example_manifest().read_text().splitlines() if line]
    files = [example_manifest().parent / r["audio_filepath"] for r in rows]
    model = load_model()
    greedy = model.transcribe(files, DecodingOptions(strategy="greedy"))
    verify = model.transcribe(files, DecodingOptions(strategy="verify", verify="exact"))
    assert all(r.error is None and r.text for r in greedy)
    assert [r.tokens for r in verify] == [r.tokens for r in greedy]
    assert sum(r.decoder_calls for r in verify) <= sum(r.decoder_calls for r in greedy)


def test_export_drops_a_tied_ctc_head_and_its_flag(tmp_path):
    # The tied head reads the decoder's embedding: with the head gone, a config that still said
    # ctc_tied would describe a head that is not there.
    tok = train_tokenizer(SENTENCES, tmp_path / "tok.model", vocab_size=40)
    config = preset("tiny", tok.vocab_size).replace(ctc=True, ctc_on="adapter", ctc_tied=True)
    src = save_checkpoint(SpeechLLaMA(config).eval(), tok, tmp_path / "ckpt")
    model = read_checkpoint_config(export_model(src, tmp_path / "out"))["model"]
    assert model["ctc"] is False and model["ctc_tied"] is False
