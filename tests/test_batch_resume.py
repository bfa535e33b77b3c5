"""Batch jobs lose nothing: ``transcribe --output``, ``evaluate`` and ``train`` are killed with
SIGKILL at random moments, re-run, and must end exactly where an uninterrupted run ends, with
every output file valid at every kill and the finished work skipped on re-run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transcribe import make_checkpoint, write_wav

from speechllama.checkpoint import list_checkpoints, load_checkpoint
from speechllama.cli import main
from speechllama.resultlog import ResultLog, read_rows, replace_rows
from speechllama.text import train_tokenizer
from speechllama.transcribe import Transcriber

torch.set_num_threads(1)
_FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused: each example rewrites it
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-c", "import sys; from speechllama.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A random ``tiny`` checkpoint and 16 clips of 0.3 to 1.05 s."""
    root = tmp_path_factory.mktemp("job")
    clips = [write_wav(root / f"u{i:02d}.wav", 0.3 + 0.05 * i, seed=i) for i in range(16)]
    return make_checkpoint(root / "model"), clips


# --- the result log ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(
    rows=st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=8)), max_size=8),
    cut=st.floats(0, 1),
)
def test_a_cut_at_any_byte_loses_only_the_row_being_written(tmp_path, rows, cut) -> None:
    path = tmp_path / "out.jsonl"
    replace_rows(path, rows)
    data = path.read_bytes()
    at = int(cut * len(data))
    path.write_bytes(data[:at])  # a kill inside a write leaves a prefix of the bytes
    kept, torn = read_rows(path)
    complete = data[:at].count(b"\n")
    assert kept == rows[:complete] and torn == (at > 0 and not data[:at].endswith(b"\n"))
    with ResultLog(path, durable=False) as log:
        log.append({"next": "row"})
    again, torn = read_rows(path)
    assert again == [*rows[:complete], {"next": "row"}] and not torn
    assert _valid_jsonl(path) == again


# --- kill, re-run, compare ----------------------------------------------------------------------


def _kill_at_random(argv: list[str], watch: Path, rng: random.Random, check) -> bool:
    """Start ``argv``, wait until ``watch`` has grown (work is under way), SIGKILL it after a
    random further delay, then ``check()`` the files. Returns whether the kill hit a live run."""
    before = watch.stat().st_size if watch.exists() else 0
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if watch.exists() and watch.stat().st_size > before:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.15))
    hit = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check()
    return hit


def _valid_jsonl(path: Path) -> list[dict]:
    """Every complete line parses; at most the last (no newline) is torn."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    return [json.loads(line) for line in lines[:-1]]


def test_transcribe_output_survives_sigkill_and_resumes(job, tmp_path, capsys) -> None:
    ckpt, wavs = job
    files = [str(w) for w in wavs]
    common = ["--model", str(ckpt), "--threads", "1", "--batch-size", "2"]
    ref = tmp_path / "ref.jsonl"
    assert main(["transcribe", *files, "-o", str(ref), *common]) == 0
    out = tmp_path / "out.jsonl"
    argv = [*CLI, "transcribe", *files, "-o", str(out), *common]
    rng = random.Random(0)
    hits = sum(_kill_at_random(argv, out, rng, lambda: _valid_jsonl(out)) for _ in range(2))
    assert hits >= 1
    partial = {r["audio_filepath"] for r in read_rows(out)[0]}
    capsys.readouterr()
    assert main(["transcribe", *files, "-o", str(out), *common]) == 0
    if partial:
        assert f"skipping {len(partial)} file(s) already in" in capsys.readouterr().err
    rows = _valid_jsonl(out)
    assert out.read_bytes().endswith(b"\n")
    got = {r["audio_filepath"]: r["text"] for r in rows}
    want = {r["audio_filepath"]: r["text"] for r in _valid_jsonl(ref)}
    assert got == want and len(rows) == len(files)  # nothing lost, nothing twice


def test_evaluate_survives_sigkill_and_skips_finished_utterances(
    job, tmp_path, monkeypatch
) -> None:
    ckpt, wavs = job
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(
        json.dumps({"audio_filepath": str(w), "text": "a stitch in time",
                    "duration": sf.info(w).duration}) + "\n" for w in wavs))  # fmt: skip
    common = ["--model", str(ckpt), "--threads", "1", "--batch-size", "2", "--no-head-accuracy"]
    assert main(["evaluate", str(manifest), "--out", str(tmp_path / "ref"), *common]) == 0
    out = tmp_path / "killed"
    hyp = out / "hypotheses.jsonl"
    argv = [*CLI, "evaluate", str(manifest), "--out", str(out), *common]
    rng = random.Random(1)
    hits = sum(_kill_at_random(argv, hyp, rng, lambda: _valid_jsonl(hyp)) for _ in range(2))
    assert hits >= 1
    finished = len(read_rows(hyp)[0])
    transcribed: list[int] = []
    real = Transcriber.transcribe_iter

    def counting(self, inputs, *args, **kwargs):
        transcribed.append(len(inputs))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Transcriber, "transcribe_iter", counting)
    assert main(["evaluate", str(manifest), "--out", str(out), *common]) == 0
    assert transcribed == [len(wavs) - finished]  # the finished ones were not redone
    ref_rows = _valid_jsonl(tmp_path / "ref" / "hypotheses.jsonl")
    rows = _valid_jsonl(hyp)
    assert [r["audio_filepath"] for r in rows] == [str(w) for w in wavs]  # manifest order
    assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in ref_rows]
    ref_sum = json.loads((tmp_path / "ref" / "summary.json").read_text())
    got_sum = json.loads((out / "summary.json").read_text())
    for key in ("wer", "substitutions", "deletions", "insertions", "words", "decoder_calls"):
        assert got_sum[key] == ref_sum[key], key


def test_a_different_model_or_options_start_afresh(job, tmp_path) -> None:
    ckpt, wavs = job
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(
        json.dumps({"audio_filepath": str(w), "text": "hi", "duration": sf.info(w).duration})
        + "\n" for w in wavs[:3]))  # fmt: skip
    common = ["--model", str(ckpt), "--threads", "1", "--no-head-accuracy"]
    out = tmp_path / "ev"
    assert main(["evaluate", str(manifest), "--out", str(out), *common]) == 0
    first = _valid_jsonl(out / "hypotheses.jsonl")
    assert (
        main(
            ["evaluate", str(manifest), "--out", str(out), *common, "--max-tokens-per-second", "2"]
        )
        == 0
    )
    second = _valid_jsonl(out / "hypotheses.jsonl")
    assert len(second) == 3 and all(len(r["token_ids"]) <= 16 + 2 for r in second)
    assert json.loads((out / "run.json").read_text())["options"]["max_tokens_per_second"] == 2
    assert len(first) == 3


# --- training -----------------------------------------------------------------------------------


def _corpus(root: Path) -> tuple[Path, Path]:
    words = ["red cat", "blue dog", "green tea", "open door", "big sun", "small map"]
    rows = []
    for i, text in enumerate(words):
        seconds = 0.4 + 0.08 * i
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(root / f"t{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t)), 16000)
        rows.append({"audio_filepath": str(root / f"t{i}.wav"), "text": text, "duration": seconds})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer(words * 3, root / "tok.model", vocab_size=24)
    return root / "train.jsonl", root / "tok.model"


def test_train_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    manifest, tok = _corpus(tmp_path)
    args = ["train", "--train", str(manifest), "--tokenizer", str(tok), "--preset", "tiny",
            "--max-steps", "8", "--max-duration", "1.2", "--buckets", "2", "--warmup", "2",
            "--save-every", "2", "--keep-last", "10", "--log-every", "1", "--no-progress",
            "--threads", "1", "--eval-every", "100"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *args, "--out", str(run)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(2).uniform(0, 0.3))  # maybe inside the next save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = list_checkpoints(run)
    assert kept and all(load_checkpoint(p) for p in kept)  # whatever exists is complete
    assert main([*args, "--out", str(run), "--resume"]) == 0
    a, _, _ = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b, _, doc = load_checkpoint(list_checkpoints(run)[-1])
    assert doc["training"]["steps"] == 8
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
