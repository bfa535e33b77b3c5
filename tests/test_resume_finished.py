"""`train --resume` of a run that already reached --max-steps trains nothing: it used to train
one step past the end (a SIGKILL landing after the last checkpoint, then --resume, gave step 9
of an 8-step run)."""

from __future__ import annotations

from pathlib import Path

from test_batch_resume import _corpus

from speechllama.checkpoint import list_checkpoints, load_checkpoint
from speechllama.cli import main


def test_resuming_a_finished_run_trains_no_more_steps(tmp_path: Path) -> None:
    manifest, tok = _corpus(tmp_path)
    args = ["train", "--train", str(manifest), "--tokenizer", str(tok), "--preset", "tiny",
            "--max-steps", "3", "--max-duration", "1.2", "--buckets", "2", "--warmup", "1",
            "--save-every", "3", "--log-every", "1", "--no-progress", "--threads", "1",
            "--eval-every", "100", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    before = list_checkpoints(tmp_path / "run")
    assert main([*args, "--resume"]) == 0
    after = list_checkpoints(tmp_path / "run")
    assert after == before
    _, _, doc = load_checkpoint(after[-1])
    assert doc["training"]["steps"] == 3
