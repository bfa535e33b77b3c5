"""End to end on a tiny synthetic corpus: synthesize speech, write a manifest, train a tokenizer
and the ``tiny`` preset with the ``speechllama train`` CLI until greedy decoding reproduces a
training utterance exactly, then save, reload and decode the same.

espeak-ng makes the speech; without it (it is a Debian package) the test falls back to one
distinct tone chord per sentence, which the model can memorise just as well.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllama.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from speechllama.cli import main
from speechllama.text import normalize
from speechllama.transcribe import Transcriber

SENTENCES = ["open the red door", "we like green tea", "the cat sat down", "birds sing at dawn"]
STEPS_PER_ROUND = 50
MAX_STEPS = 400


def _synthesize(text: str, path: Path, index: int) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak:
        cmd = [espeak, "-v", "en-us", "-s", "175", "-w", str(path), text]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        return
    t = np.arange(int(1.2 * 16000)) / 16000
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220 * (index + 1), 330 * (index + 1)))
    sf.write(path, (0.2 * chord).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    rows = []
    for i, text in enumerate(SENTENCES):
        path = root / f"utt{i}.wav"
        _synthesize(text, path, i)
        info = sf.info(path)
        rows.append({"audio_filepath": str(path), "text": text,
                     "duration": info.frames / info.samplerate})  # fmt: skip
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "text.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n")
    return manifest, text


def _exact(transcriber: Transcriber, manifest: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    results = transcriber.transcribe([r["audio_filepath"] for r in rows], batch_size=4)
    hyps = [r.text for r in results]
    return hyps, [normalize(r["text"]) for r in rows]


@pytest.mark.slow
def test_train_tiny_until_it_transcribes_a_training_utterance(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    manifest, text = corpus
    out = tmp_path / "run"
    args = [
        "train", "--train", str(manifest), "--text", str(text), "--vocab-size", "26",
        "--preset", "tiny", "--out", str(out), "--max-duration", "30", "--warmup", "10",
        "--lr", "5e-3", "--no-spec-augment", "--save-every", "1000", "--log-every", "10",
        "--threads", "1", "--no-progress", "--seed", "0",
    ]  # fmt: skip
    steps = 0
    hyps: list[str] = []
    refs: list[str] = []
    while steps < MAX_STEPS:
        steps += STEPS_PER_ROUND
        # The first round starts the run; later rounds continue it with --resume.
        resume = ["--resume"] if steps > STEPS_PER_ROUND else []
        assert main([*args, "--max-steps", str(steps), *resume]) == 0
        model, tokenizer, _ = load_checkpoint(list_checkpoints(out)[-1])
        hyps, refs = _exact(Transcriber(model, tokenizer), manifest)
        if any(h == r for h, r in zip(hyps, refs, strict=True)):
            break
    assert any(h == r for h, r in zip(hyps, refs, strict=True)), (steps, hyps, refs)
    assert (out / "tokenizer.model").is_file()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert all(e["audio_h_per_h"] > 0 for e in events if e["event"] == "train")

    # Save the trained model again, reload it from disk, decode the same transcripts.
    saved = save_checkpoint(model, tokenizer, tmp_path / "export", meta={"test": "e2e"})
    reloaded, tok2, doc = load_checkpoint(saved)
    assert doc["training"] == {"test": "e2e"}
    again, _ = _exact(Transcriber(reloaded, tok2), manifest)
    assert again == hyps
