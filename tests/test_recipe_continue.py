"""recipes/synthetic/continue.sh at toy scale: new espeak-ng audio plus a mixed-in manifest,
then the bundled model continued jointly (trunk and heads together, from cached encoder
outputs), or split (its trunk as a next-token model, then its own heads put back and tuned);
each ends in an fp16 export with the source's heads config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from speechllama.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "synthetic" / "continue.sh"
DEFAULT = ROOT / "speechllama" / "models" / "default"
pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("bash") is None, reason="needs espeak-ng"
)


def _continue(tmp_path: Path, *extra: str) -> Path:
    """Run continue.sh on two tiny sentence lists plus a one-row mixed-in manifest; -> EXP."""
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("the cat sat on the mat\nshe sells sea shells\n" * 20)
    (text / "dev.txt").write_text("a quick brown fox\nbirds fly south in winter\n")
    tone = tmp_path / "tone.wav"
    sf.write(tone, 0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220), 16000)
    mixed = tmp_path / "extra.jsonl"
    mixed.write_text(json.dumps({"audio_filepath": str(tone), "duration": 1.0, "text": "one"}))
    exp = tmp_path / "exp"
    args = ["--exp", str(exp), "--text", str(text), "--hours", "0.003", "--voices", "espeak-ng"]
    args += ["--steps", "2", "--head-steps", "1", "--max-duration", "20", "--mix", str(mixed)]
    env = {**os.environ, "SPEECHLLAMA": str(Path(sys.executable).parent / "speechllama")}
    p = subprocess.run(
        ["bash", str(SCRIPT), *args, *extra], capture_output=True, text=True, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = (exp / "data" / "train" / "mixed.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["text"] == "one" and len(rows) > 1
    return exp


def _heads_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["model"]["heads"]


def test_joint_continuation_trains_trunk_and_heads_from_cached_encoder_outputs(tmp_path):
    exp = _continue(tmp_path, "--lm-weight", "0.1")
    assert any((exp / "encoder_cache").rglob("shard-*.safetensors"))  # the encoder ran once
    events = [json.loads(x) for x in (exp / "joint" / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["ctc_weight"] == 0.3 and not start["head_one_frozen"]
    assert start["lm_sentences"] == 2  # train.txt's two sentences, as text without audio
    assert all("text_ce" in e for e in events if e["event"] == "train")
    assert next(e for e in events if e["event"] == "end")["step"] == 2
    trained = json.loads((exp / "joint" / "best" / "config.json").read_text())["model"]
    k = trained["heads"]["num_heads"]
    assert trained["heads"]["loss_weights"] == [1.0, 0.4, 0.3, *[0.2] * (k - 3)][:k]
    final = json.loads((exp / "final" / "config.json").read_text())
    assert final["model"]["heads"]["kind"] == _heads_config(DEFAULT)["kind"]
    assert final["model"]["heads"]["num_heads"] == k
    assert final["weights"]["dtype"] == "float16" and final["model"]["ctc"] is False


def test_split_continuation_keeps_the_heads(tmp_path):
    # A source whose head 1 is the plain un-embedding (heads trained on a frozen trunk): the
    # bundled model with its head-1 map reset to the identity.
    model, tokenizer, _ = load_checkpoint(DEFAULT)
    d = model.config.decoder.d_model
    with torch.no_grad():
        model.heads.maps[:d] = torch.eye(d)
    source = save_checkpoint(model, tokenizer, tmp_path / "source")
    exp = _continue(tmp_path, "--mode", "split", "--from", str(source), "--cache-copies", "0")
    trunk = _heads_config(exp / "nt" / "best")
    assert (trunk["kind"], trunk["num_heads"]) == ("linear", 1)
    final = json.loads((exp / "final" / "config.json").read_text())
    shape = {k: v for k, v in _heads_config(source).items() if k != "loss_weights"}
    assert {k: v for k, v in final["model"]["heads"].items() if k != "loss_weights"} == shape
    assert final["weights"]["dtype"] == "float16"
    # --heads-from: heads 2..K start from the source's trained maps, not as copies of head 1
    with safe_open(str(exp / "final" / "model.safetensors"), "np") as f:
        maps = f.get_tensor("heads.maps").astype(np.float32)
    assert np.array_equal(maps[:d], np.eye(d, dtype=np.float32))  # head 1: the trunk's own
    assert not np.allclose(maps[d : 2 * d], np.eye(d), atol=1e-2)


def test_split_continuation_refuses_a_joint_trained_source(tmp_path):
    """The bundled model's head 1 was trained with its trunk: reducing it to the trunk alone
    would change greedy output, so split mode stops with the reason instead."""
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("the cat sat on the mat\n" * 10)
    (text / "dev.txt").write_text("a quick brown fox\n")
    env = {**os.environ, "SPEECHLLAMA": str(Path(sys.executable).parent / "speechllama")}
    args = ["--exp", str(tmp_path / "exp"), "--text", str(text), "--hours", "0.001"]
    args += ["--voices", "espeak-ng", "--steps", "1", "--mode", "split", "--cache-copies", "0"]
    p = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)
    assert p.returncode != 0
    assert "not the plain un-embedding" in p.stderr


def test_bad_arguments_stop_before_any_work(tmp_path):
    """A wrong --from or --mode is one line on stderr and exit 1, before audio is synthesized."""
    exp = tmp_path / "exp"
    for args, message in (
        (["--from", str(tmp_path / "nope")], "not a checkpoint directory"),
        (["--mode", "bogus"], "--mode is joint or split"),
    ):
        p = subprocess.run(
            ["bash", str(SCRIPT), "--exp", str(exp), *args], capture_output=True, text=True
        )
        assert p.returncode == 1 and message in p.stderr
        assert not exp.exists()
