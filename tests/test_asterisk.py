"""The Asterisk locked set: which prompts are kept, the manifest it writes, and clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import asterisk_tree

from speechllama.cli import main as cli_main
from speechllama.data.asterisk import reject_reason, write_tsv


def test_reject_reason_rules() -> None:
    assert reject_reason("Please enter your agent number now.", 5) is None
    assert reject_reason("Thank you.", 5) == "fewer than 5 words"
    assert reject_reason("Press 1 to mute or unmute yourself.", 5) == "digits, symbols or notes"
    assert reject_reason("press # to enter a new dictation filename", 5) is not None
    assert reject_reason("[this is a simple beep tone]", 1) is not None


def test_write_tsv_keeps_scorable_sentences_with_audio(tmp_path: Path) -> None:
    root = asterisk_tree(tmp_path / "root")
    sel = write_tsv(root, tmp_path / "out/manifest.tsv")
    assert sel.kept == 2
    assert sel.dropped == {"fewer than 5 words": 1, "digits, symbols or notes": 3, "no wav": 1,
                           "longer than 30 s": 1}  # fmt: skip
    lines = sel.tsv.read_text("utf-8").splitlines()
    assert lines[0].split("\t") == ["path", "text", "id", "speaker", "source", "license"]
    ids = [line.split("\t")[2] for line in lines[1:]]
    assert ids == ["agent-alreadyon", "dictate_forhelp"]  # the subfolder prompt is found too
    assert "logged on. Please" in lines[1]  # runs of spaces collapse


def test_cli_writes_a_manifest_of_real_durations(tmp_path: Path) -> None:
    root = asterisk_tree(tmp_path / "root")
    out = tmp_path / "asterisk-locked"
    assert cli_main(["data", "asterisk", str(root), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["agent-alreadyon", "dictate_forhelp"]
    assert [r["duration"] for r in rows] == pytest.approx([2.0, 2.5])
    assert all(Path(r["audio_filepath"]).is_file() and r["license"] == "CC-BY-SA-3.0" for r in rows)


def test_cli_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["data", "asterisk", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        cli_main(["data", "asterisk", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    )
    assert "core-sounds-en.txt" in capsys.readouterr().err
