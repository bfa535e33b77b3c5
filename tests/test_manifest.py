"""Manifest validation: every kind of bad row reported at once, with its line number."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllama.cli import main as cli_main
from speechllama.data.manifest import (
    ManifestError,
    Utterance,
    check_manifest,
    load_manifest,
    write_manifest,
)

RATE = 16000


def _wav(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE)
    return path


def _write(path: Path, rows: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    _wav(tmp_path / "wavs" / "a.wav", 1.0)
    _wav(tmp_path / "wavs" / "b.wav", 2.0)
    _wav(tmp_path / "wavs" / "c.wav", 0.5)
    (tmp_path / "wavs" / "junk.wav").write_bytes(b"RIFF not really a wav file at all")
    return tmp_path


def test_valid_manifest_resolves_paths_and_keeps_extras(data: Path) -> None:
    other = _wav(data / "elsewhere" / "d.wav", 1.5)
    rows = [
        {"audio_filepath": "wavs/a.wav", "text": "Hello there.", "duration": 1.0, "speaker": 7},
        {"audio_filepath": str(other), "text": "x y", "duration": 1.52, "lang": "en"},
        {"audio_filepath": "wavs/b.wav", "text": "seg", "duration": 0.5, "offset": 1.25},
        "",  # blank lines are ignored
    ]
    sub = data / "manifests"
    sub.mkdir()
    rows[0]["audio_filepath"] = "../wavs/a.wav"
    rows[2]["audio_filepath"] = "../wavs/b.wav"
    utts = load_manifest(_write(sub / "m.jsonl", rows))
    assert [u.audio_filepath for u in utts] == [
        str(data / "wavs" / "a.wav"),
        str(other),
        str(data / "wavs" / "b.wav"),
    ]
    assert utts[0].speaker == "7" and utts[0].text == "Hello there."
    assert utts[1].extra == {"lang": "en"}
    assert utts[2].offset == 1.25 and utts[2].key.endswith("b.wav@1.25")


def test_all_bad_rows_reported_at_once(data: Path) -> None:
    good = {"audio_filepath": "wavs/a.wav", "text": "fine", "duration": 1.0, "id": "u1"}
    rows: list[object] = [
        good,  # 1
        '{"audio_filepath": "wavs/b.wav", "text": "oops"',  # 2 malformed JSON
        ["not", "an", "object"],  # 3
        {"audio_filepath": "wavs/b.wav", "duration": 2.0},  # 4 missing text
        {"text": "no path"},  # 5 missing two keys
        {"audio_filepath": "wavs/missing.wav", "text": "gone", "duration": 1.0},  # 6
        {"audio_filepath": "wavs/junk.wav", "text": "junk", "duration": 1.0},  # 7 unreadable
        {"audio_filepath": "wavs/b.wav", "text": "   ", "duration": 2.0},  # 8 empty text
        {"audio_filepath": "wavs/b.wav", "text": "?!", "duration": 2.0},  # 9 no words
        {"audio_filepath": "wavs/b.wav", "text": "far off", "duration": 3.0},  # 10
        {"audio_filepath": "wavs/b.wav", "text": "neg", "duration": -1},  # 11
        {"audio_filepath": "wavs/b.wav", "text": "str", "duration": "2.0"},  # 12
        {"audio_filepath": "wavs/b.wav", "text": "t", "duration": 2.0, "speaker": ["x"]},  # 13
        {"audio_filepath": "wavs/c.wav", "text": "dup id", "duration": 0.5, "id": "u1"},  # 14
        {"audio_filepath": "wavs/b.wav", "text": "ok", "duration": 2.05},  # 15 within tolerance
        {"audio_filepath": "wavs/b.wav", "text": "same file", "duration": 2.0},  # 16 dup audio
        {"audio_filepath": "wavs/b.wav", "text": "s", "duration": 1.0, "offset": 1.5},  # 17
    ]
    manifest = _write(data / "bad.jsonl", rows)
    check = check_manifest(manifest)
    found = {p.line: p.message for p in check.problems}
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17]
    assert found[2].startswith("malformed JSON")
    assert "expected a JSON object, got list" in found[3]
    assert found[4] == "missing key text"
    assert found[5] == "missing keys audio_filepath, duration"
    assert "missing.wav: file not found" in found[6]
    assert "junk.wav" in found[7] and "audio" in found[7]
    assert found[8] == "empty text"
    assert "no words after normalisation" in found[9]
    assert "duration 3 s but" in found[10] and "lasts 2.000 s" in found[10]
    assert "'duration' must be positive" in found[11]
    assert "'duration' must be a finite number" in found[12]
    assert "'speaker' must be a string" in found[13]
    assert found[14] == "duplicate id 'u1' (first on line 1)"
    assert "duplicate audio" in found[16] and "(first on line 15)" in found[16]
    assert "runs past the end" in found[17]
    assert [u.text for u in check.utterances] == ["fine", "ok"]
    assert check.rows == 17 and not check.ok

    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{manifest}: 15 bad rows of 17: line 2: malformed JSON")
    assert "and 10 more" in message
    assert len(info.value.problems) == 15


def test_skip_bad_keeps_valid_rows_and_warns(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows: list[object] = [
        {"audio_filepath": "wavs/a.wav", "text": "one", "duration": 1.0},
        "{broken",
        {"audio_filepath": "wavs/c.wav", "text": "two", "duration": 0.5},
    ]
    manifest = _write(data / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        utts = load_manifest(manifest, skip_bad=True)
    assert [u.text for u in utts] == ["one", "two"]
    assert "1 bad row of 3: line 2: malformed JSON" in caplog.text
    all_bad = _write(data / "none.jsonl", ["{broken"])
    with pytest.raises(ManifestError, match="no valid rows"):
        load_manifest(all_bad, skip_bad=True)


def test_check_audio_off_and_tolerance(data: Path) -> None:
    rows = [{"audio_filepath": "wavs/nowhere.wav", "text": "a", "duration": 9.0}]
    assert len(load_manifest(_write(data / "m.jsonl", rows), check_audio=False)) == 1
    rows = [{"audio_filepath": "wavs/a.wav", "text": "a", "duration": 1.3}]
    manifest = _write(data / "t.jsonl", rows)
    with pytest.raises(ManifestError, match=r"tolerance 0\.1 s"):
        load_manifest(manifest)
    assert load_manifest(manifest, duration_tolerance=0.5)[0].duration == 1.3
    with pytest.raises(ManifestError, match="exceeds the 1 s limit"):
        load_manifest(manifest, duration_tolerance=0.5, max_seconds=1.0)


def test_unreadable_manifest_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"nope\.jsonl: cannot read"):
        check_manifest(tmp_path / "nope.jsonl")


def test_write_manifest_round_trip(data: Path) -> None:
    outside = _wav(data.parent / f"{data.name}_outside" / "o.wav", 1.0)
    utts = [
        Utterance(str(data / "wavs" / "a.wav"), "Hello", 1.0, speaker="s1", voice="v", id="a"),
        Utterance(str(outside), "Out side", 1.0, source="synth", extra={"snr": 20}),
        Utterance(str(data / "wavs" / "b.wav"), "seg", 0.5, offset=1.0),
    ]
    manifest = data / "m.jsonl"
    assert write_manifest(utts, manifest) == 3
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {
        "audio_filepath": "wavs/a.wav",
        "text": "Hello",
        "duration": 1.0,
        "speaker": "s1",
        "voice": "v",
        "id": "a",
    }
    assert rows[1]["audio_filepath"] == str(outside) and rows[1]["snr"] == 20
    assert rows[2]["offset"] == 1.0
    assert load_manifest(manifest) == utts
    # a path outside the manifest's folder stays absolute; relative=False keeps all absolute
    write_manifest(utts[:1], data / "sub" / "m2.jsonl")
    row = json.loads((data / "sub" / "m2.jsonl").read_text())
    assert row["audio_filepath"] == str(data / "wavs" / "a.wav")
    write_manifest(utts[:1], data / "m3.jsonl", relative=False)
    assert json.loads((data / "m3.jsonl").read_text())["audio_filepath"] == utts[0].audio_filepath
    # rows written relative to the manifest's folder survive moving the whole folder
    moved = data.parent / f"{data.name}_moved"
    data.rename(moved)
    assert load_manifest(moved / "m.jsonl")[0].audio_filepath == str(moved / "wavs" / "a.wav")


def test_lhotse_cut_manifest(data: Path) -> None:
    lhotse = pytest.importorskip("lhotse")
    recording = lhotse.Recording.from_file(data / "wavs" / "b.wav", recording_id="rec-b")
    sup = lhotse.SupervisionSegment(
        id="sup", recording_id="rec-b", start=0.0, duration=1.0, text="Hi there", speaker="spk"
    )
    cut = lhotse.MonoCut(
        id="cut-1", start=0.5, duration=1.0, channel=0, recording=recording, supervisions=[sup]
    )
    whole = lhotse.MonoCut(
        id="cut-2", start=0.0, duration=2.0, channel=0, recording=recording, supervisions=[sup]
    )
    path = data / "cuts.jsonl.gz"
    lhotse.CutSet.from_cuts([cut, whole]).to_file(path)
    utts = load_manifest(path)
    assert [(u.id, u.offset, u.duration, u.text, u.speaker) for u in utts] == [
        ("cut-1", 0.5, 1.0, "Hi there", "spk"),
        ("cut-2", 0.0, 2.0, "Hi there", "spk"),
    ]
    assert utts[0].audio_filepath == str(data / "wavs" / "b.wav")


def test_cli_validate(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[object] = [
        {"audio_filepath": "wavs/a.wav", "text": "one", "duration": 1.0},
        "{broken",
        {"audio_filepath": "wavs/missing.wav", "text": "two", "duration": 0.5},
    ]
    manifest = _write(data / "m.jsonl", rows)
    assert cli_main(["data", "validate", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert f"{manifest}:2: malformed JSON" in captured.out
    assert f"{manifest}:3: audio " in captured.out and "file not found" in captured.out
    assert "3 rows, 1 valid, 2 bad" in captured.out
    clean = data / "clean.jsonl"
    assert cli_main(["data", "validate", str(manifest), "--skip-bad", "--out", str(clean)]) == 0
    assert [u.text for u in load_manifest(clean)] == ["one"]
    good = _write(data / "good.jsonl", rows[:1])
    assert cli_main(["data", "validate", str(good)]) == 0
    assert "1 rows, 1 valid, 0 bad" in capsys.readouterr().out


# --- import of the shared manifest.tsv files ---------------------------------------------------


def _fsdd_like(root: Path) -> Path:
    """A miniature FSDD: id, path, split, speaker, gender, text; labels as digits and words."""
    for name, seconds in (("0_george_0", 0.3), ("7_theo_12", 0.6), ("3_lucas_40", 0.5)):
        _wav(root / "recordings" / f"{name}.wav", seconds)
    lines = [
        "id\tpath\tsplit\tspeaker\tgender\ttext",
        "0_george_0\trecordings/0_george_0.wav\ttest\tgeorge\tmale\tzero",
        "7_theo_12\trecordings/7_theo_12.wav\ttrain\ttheo\tmale\t7",
        "3_lucas_40\trecordings/3_lucas_40.wav\ttrain\tlucas\tmale\tthree",
        "9_gone_1\trecordings/9_gone_1.wav\ttrain\tgone\tmale\tnine",
        'q_1\trecordings/0_george_0.wav\ttrain\tgeorge\tmale\t"quoted" text',
    ]
    tsv = root / "manifest.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def test_import_tsv_splits_and_references_audio(tmp_path: Path) -> None:
    from speechllama.data.tsv import import_tsv

    tsv = _fsdd_like(tmp_path / "fsdd")
    result = import_tsv(tsv, tmp_path / "out")
    assert set(result.manifests) == {"test", "train"}
    assert result.manifests["train"] == tmp_path / "out" / "fsdd_train.jsonl"
    assert result.counts == {"test": 1, "train": 3}
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"{tsv}:5: ") and "file not found" in result.problems[0]
    train = load_manifest(result.manifests["train"])
    assert [(u.id, u.text, u.speaker, u.source) for u in train] == [
        ("7_theo_12", "seven", "theo", "fsdd"),
        ("3_lucas_40", "three", "lucas", "fsdd"),
        ("q_1", '"quoted" text', "george", "fsdd"),
    ]
    assert train[0].audio_filepath == str(tmp_path / "fsdd" / "recordings" / "7_theo_12.wav")
    assert train[0].duration == pytest.approx(0.6) and train[0].extra == {"gender": "male"}
    row = json.loads(result.manifests["test"].read_text(encoding="utf-8"))
    assert Path(row["audio_filepath"]).is_absolute()


def test_import_tsv_copy_audio_is_self_contained(tmp_path: Path) -> None:
    from speechllama.data.tsv import import_tsv

    tsv = _fsdd_like(tmp_path / "fsdd")
    result = import_tsv(tsv, tmp_path / "out", name="digits", copy_audio=True)
    row = json.loads(result.manifests["test"].read_text(encoding="utf-8").splitlines()[0])
    assert row["audio_filepath"] == "digits/recordings/0_george_0.wav"
    assert result.manifests["test"].name == "digits_test.jsonl"
    (tmp_path / "out").rename(tmp_path / "moved")
    assert len(load_manifest(tmp_path / "moved" / "digits_train.jsonl")) == 3


def test_import_tsv_without_split_and_bad_header(tmp_path: Path) -> None:
    from speechllama.data.tsv import import_tsv

    _wav(tmp_path / "smoke" / "a.wav", 1.0)
    tsv = tmp_path / "smoke" / "manifest.tsv"
    tsv.write_text("id\tpath\tduration_s\tlicense\ttext\na\ta.wav\t9.9\tCC0\tHi.\n", "utf-8")
    result = import_tsv(tsv, tmp_path / "out")
    utts = load_manifest(result.manifests["smoke"])
    # the header's duration, not the TSV's claimed 9.9 s; license kept as an extra key
    assert utts[0].duration == pytest.approx(1.0) and utts[0].extra == {"license": "CC0"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tfile\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tsv: header lacks column\(s\) path, text"):
        import_tsv(bad, tmp_path / "out")


def test_cli_import_tsv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = _fsdd_like(tmp_path / "fsdd")
    assert cli_main(["data", "import-tsv", str(tsv), "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "fsdd_train.jsonl: 3 utterances" in captured.out
    assert "9_gone_1.wav: file not found" in captured.err and "1 row(s) skipped" in captured.err


def test_bundled_examples_are_valid_and_small() -> None:
    from speechllama.assets import ASSETS_DIR, example_manifest

    utts = load_manifest(example_manifest())
    assert len(utts) == 10
    assert {u.source for u in utts} == {"ljspeech", "fsdd"}
    assert all(u.extra["license"] in ("public domain", "CC BY-SA 4.0") for u in utts)
    assert all(Path(u.audio_filepath).parent == ASSETS_DIR / "audio" for u in utts)
    size = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert size < 1_000_000


def test_cli_synth_placeholder_when_synthesis_cannot_import(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "speechllama.data.synth", None)  # import raises ImportError
    assert cli_main(["data", "synth"]) == 1
    assert "synthesis is unavailable" in capsys.readouterr().err
