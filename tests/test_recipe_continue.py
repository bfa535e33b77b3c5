"""recipes/synthetic/continue.sh at toy scale: new espeak-ng audio plus a mixed-in manifest,
the bundled model's trunk trained as a next-token model, its own heads put back and tuned, an
fp16 export with the source's heads config."""

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
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "synthetic" / "continue.sh"
DEFAULT = ROOT / "speechllama" / "models" / "default"
pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("bash") is None, reason="needs espeak-ng"
)


def test_continue_keeps_the_heads_and_mixes_manifests(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("the cat sat on the mat\nshe sells sea shells\n" * 20)
    (text / "dev.txt").write_text("a quick brown fox\nbirds fly south in winter\n")
    tone = tmp_path / "tone.wav"
    sf.write(tone, 0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220), 16000)
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"audio_filepath": str(tone), "duration": 1.0, "text": "one"}))
    exp = tmp_path / "exp"
    args = ["--exp", str(exp), "--text", str(text), "--hours", "0.003", "--voices", "espeak-ng"]
    args += ["--steps", "2", "--head-steps", "1", "--max-duration", "20", "--mix", str(extra)]
    env = {**os.environ, "SPEECHLLAMA": str(Path(sys.executable).parent / "speechllama")}
    p = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = (exp / "data" / "train" / "mixed.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["text"] == "one" and len(rows) > 1
    trunk = json.loads((exp / "nt" / "best" / "config.json").read_text())["model"]["heads"]
    assert (trunk["kind"], trunk["num_heads"]) == ("linear", 1)
    source = json.loads((DEFAULT / "config.json").read_text())["model"]["heads"]
    final = json.loads((exp / "final" / "config.json").read_text())
    assert final["model"]["heads"] == source and final["weights"]["dtype"] == "float16"
    # --heads-from: heads 2..K start from the source's trained maps, not as copies of head 1
    with safe_open(str(exp / "final" / "model.safetensors"), "np") as f:
        maps = f.get_tensor("heads.maps").astype(np.float32)
    d = maps.shape[1]
    assert np.array_equal(maps[:d], np.eye(d, dtype=np.float32))  # head 1: the trunk's own
    assert not np.allclose(maps[d : 2 * d], np.eye(d), atol=1e-2)
