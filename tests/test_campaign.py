"""The accuracy campaign at a tiny scale: a 2-run spec trains the ``tiny`` preset for a few
steps per run through the real `speechllama campaign run` command, scores the eval sets, writes
one results row per run (resumable: a re-run trains nothing), and the report renders a table
row per run into the generated part of a markdown file and draws the figure. Also: the data
filters, the locked FSDD set, and the recipe's stage 8."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllama.campaign import (
    RESULTS,
    CampaignError,
    Protocol,
    RunSpec,
    load_spec,
    select,
    training_rows,
)
from speechllama.campaign_report import END, START
from speechllama.cli import build_parser, main
from speechllama.data.locked import lock_fsdd
from speechllama.text import train_tokenizer

WORDS = ["red door", "green tea", "cat sat", "birds sing", "open door", "red tea"]
ROOT = Path(__file__).resolve().parents[1]

SPEC = """
[protocol]
preset = "tiny"
steps = 2
warmup = 1
lr = 1e-3
max_duration = 8.0
dev_utterances = 2
exclude = ["locked"]
plot = ["real"]
[[eval]]
set = "real"
[[eval]]
set = "digits"
limit = 2
[[run]]
name = "base"
lever = "baseline"
filter = "all"
[[run]]
name = "espeak"
lever = "voices"
filter = "engines=espeak-ng"
extra = ["--no-spec-augment"]
"""


def _tone(path: Path, freq: float, seconds: float = 0.6) -> float:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    return seconds


def _set(data: Path, name: str, rows: list[dict], relative: bool = False) -> None:
    """DATA/NAME/manifest.jsonl with one tone file per row (relative paths if asked)."""
    folder = data / name
    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        path = folder / f"u{i}.wav"
        row["duration"] = _tone(path, 200 + 90 * i + 13 * len(name))
        row["audio_filepath"] = path.name if relative else str(path)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("campaign")
    voices = ["espeak-ng/en-us", "flite/awb", "espeak-ng/en+m3", "festival/kal_diphone"]
    train = [{"text": w, "voice": voices[i % 4], "source": voices[i % 4].split("/")[0]}
             for i, w in enumerate(WORDS)]  # fmt: skip
    _set(root, "train", train, relative=True)
    _set(root, "dev", [{"text": w} for w in WORDS[:2]])
    _set(root, "real", [{"text": w, "source": f"Corpus{i % 2} (via test)"}
                        for i, w in enumerate(WORDS[:4])])  # fmt: skip
    _set(root, "digits", [{"text": t, "source": "fsdd"} for t in ("one", "two", "three")])
    # The locked set is one of the training files: excluded from every run's training data.
    first = json.loads((root / "train" / "manifest.jsonl").read_text().splitlines()[0])
    first["audio_filepath"] = str(root / "train" / first["audio_filepath"])
    (root / "locked").mkdir()
    (root / "locked" / "manifest.jsonl").write_text(json.dumps(first) + "\n")
    train_tokenizer(WORDS * 3 + ["one two three"], root / "tok.model", vocab_size=24)
    (root / "campaign.toml").write_text(SPEC)
    return root


def test_filters_choose_engines_and_nested_hours_and_exclude_the_locked_set(data: Path) -> None:
    protocol, runs = load_spec(data / "campaign.toml")
    base = training_rows(protocol, runs[0], data)
    assert len(base) == len(WORDS) - 1  # the locked file is never trained on
    assert all(Path(r["audio_filepath"]).is_absolute() for r in base)
    assert "red door" not in {r["text"] for r in base}
    espeak = training_rows(protocol, runs[1], data)
    assert [r["text"] for r in espeak] == ["cat sat", "open door"]  # not the locked red door
    rows = [{"audio_filepath": str(i), "duration": 360.0} for i in range(100)]
    small, large = (select(rows, f"hours={h}", 0, "t") for h in (1, 3))
    assert len(small) == 10 and len(large) == 30
    assert {r["audio_filepath"] for r in small} <= {r["audio_filepath"] for r in large}
    assert small == select(rows, "hours=1", 0, "t")  # deterministic
    with pytest.raises(CampaignError, match="unknown filter term"):
        select(rows, "voices=x", 0, "t")
    with pytest.raises(CampaignError, match="keeps no utterance"):
        select([{"voice": "flite/awb"}], "engines=espeak-ng", 0, "run x")
    added = training_rows(Protocol(), RunSpec("d", "digits", "engines=flite add=digits"), data)
    assert [r["text"] for r in added] == ["green tea", "red tea", "one", "two", "three"]


def test_campaign_runs_resumes_and_reports(data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    args = ["campaign", "run", str(data / "campaign.toml"), "--data", str(data), "--exp",
            str(exp), "--tokenizer", str(data / "tok.model"), "--threads", "1"]  # fmt: skip
    assert main(args) == 0, (exp / "base" / "train.log").read_text()
    rows = [json.loads(line) for line in (exp / RESULTS).read_text().splitlines()]
    assert [r["name"] for r in rows] == ["base", "espeak"]
    for row in rows:
        assert set(row["wer"]) == {"real", "digits"}
        assert all(0.0 <= w < float("inf") for w in row["wer"].values())
        assert set(row["ce"]) == {"real", "digits"} and all(c > 0 for c in row["ce"].values())
        assert set(row["by_source"]) == {"real"}  # digits has one source
        assert set(row["by_source"]["real"]) == {"Corpus0", "Corpus1"}
        assert row["steps"] == 2 and row["train_seconds"] > 0 and row["dev_ce"] > 0
    assert rows[0]["utterances"] == 5 and rows[1]["utterances"] == 2
    assert rows[0]["hours"] == pytest.approx(5 * 0.6 / 3600, abs=1e-3)
    assert rows[1]["extra"] == "--no-spec-augment"
    assert "--no-spec-augment" in (exp / "espeak" / "train.log").read_text()
    assert (exp / "base" / "eval" / "digits" / "summary.json").is_file()
    summary = json.loads((exp / "base" / "eval" / "digits" / "summary.json").read_text())
    assert summary["utterances"] == 2  # the set's limit

    log = (exp / "base" / "train.log").stat().st_mtime_ns
    assert main(args) == 0  # finished runs are skipped: nothing trains, no row is added
    assert (exp / "base" / "train.log").stat().st_mtime_ns == log
    assert len((exp / RESULTS).read_text().splitlines()) == 2

    # a row from before the CE was recorded gets it from its checkpoint, without training
    old = [{k: v for k, v in r.items() if k != "ce"} for r in rows]
    (exp / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main(args) == 0
    assert (exp / "base" / "train.log").stat().st_mtime_ns == log
    again = [json.loads(line) for line in (exp / RESULTS).read_text().splitlines()]
    assert [r["name"] for r in again] == ["base", "espeak"]
    for new, row in zip(again, rows, strict=True):
        assert new["wer"] == row["wer"]  # decoding resumed from eval/, same hypotheses
        assert new["ce"] == pytest.approx(row["ce"])

    # an eval set added to the spec later (a new locked set) is scored on the finished runs
    spec = tmp_path / "more.toml"
    spec.write_text(SPEC.replace("[[run]]", '[[eval]]\nset = "locked"\n[[run]]', 1))
    assert main([*args[:2], str(spec), *args[3:]]) == 0
    assert (exp / "base" / "train.log").stat().st_mtime_ns == log
    more = [json.loads(line) for line in (exp / RESULTS).read_text().splitlines()]
    assert all(set(r["wer"]) == {"real", "digits", "locked"} for r in more)
    assert [r["wer"]["real"] for r in more] == [r["wer"]["real"] for r in rows]
    (exp / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in again))

    doc = tmp_path / "accuracy.md"
    doc.write_text(f"# Campaign\n\nProse before.\n\n{START}\nold\n{END}\n\nProse after.\n")
    png = tmp_path / "real.png"
    report = ["campaign", "report", "--exp", str(exp), "--doc", str(doc), "--plot", str(png),
              "--spec", str(data / "campaign.toml")]  # fmt: skip
    assert main(report) == 0
    text = doc.read_text()
    assert "Prose before." in text and "Prose after." in text and "old" not in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2  # header + one row per run
    assert "WER real" in table[0] and "CE real" in table[0] and "real: Corpus0" in table[0]
    assert table[1].startswith("| base | baseline |")
    assert f"{100 * rows[0]['wer']['real']:.1f}" in table[1]
    assert f"| {rows[0]['ce']['real']:.2f} |" in table[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(report) == 0 and doc.read_text() == text  # re-rendering is stable


def test_a_failed_run_costs_only_that_run(data: Path, tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(SPEC.replace('extra = ["--no-spec-augment"]', 'extra = ["--bogus-flag"]')
                    .replace("[[eval]]\nset = \"digits\"\nlimit = 2\n", ""))  # fmt: skip
    exp = tmp_path / "exp"
    args = ["campaign", "run", str(spec), "--data", str(data), "--exp", str(exp), "--tokenizer",
            str(data / "tok.model"), "--threads", "1", "--only", "espeak",
            "--set", f'train=["{data / "train" / "manifest.jsonl"}"]']  # fmt: skip
    assert main(args) == 1
    assert not (exp / RESULTS).exists()
    assert "--bogus-flag" in (exp / "espeak" / "train.log").read_text()


def test_lock_fsdd_takes_the_last_take_of_each_speaker_and_digit(tmp_path: Path) -> None:
    rows = [
        {"audio_filepath": f"/f/{d}_{s}_{k}.wav", "text": str(d), "speaker": s, "duration": 0.5}
        for s in ("ann", "bob")
        for d in range(3)
        for k in range(4)
    ]
    rows.append({"audio_filepath": "/f/9_ann_0.wav", "text": "9", "speaker": "ann", "duration": 1})
    (tmp_path / "fsdd-train").mkdir()
    manifest = tmp_path / "fsdd-train" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lock_fsdd(tmp_path) == (6, len(rows) - 6)
    locked = (tmp_path / "fsdd-locked" / "manifest.jsonl").read_text()
    chosen = [json.loads(x) for x in locked.splitlines()]
    assert [(r["speaker"], r["text"]) for r in chosen] == [(s, str(d)) for s in ("ann", "bob")
                                                            for d in range(3)]  # fmt: skip
    assert all(r["audio_filepath"].endswith("_3.wav") for r in chosen)  # the last take
    left = {json.loads(x)["audio_filepath"] for x in manifest.read_text().splitlines()}
    assert "/f/9_ann_0.wav" in left  # a speaker's only recording of a digit stays
    assert not left & {json.loads(x)["audio_filepath"] for x in locked.splitlines()}
    after = manifest.read_text()
    assert lock_fsdd(tmp_path) == (6, len(rows) - 6)
    assert (tmp_path / "fsdd-locked" / "manifest.jsonl").read_text() == locked
    assert manifest.read_text() == after


def test_recipe_stage_8_runs_the_campaign_only_when_asked(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env["DRY_RUN"] = "1"
    script = str(ROOT / "recipes" / "synthetic" / "run.sh")
    exp = tmp_path / "exp"

    def commands(*args: str) -> list[str]:
        p = subprocess.run(["bash", script, "--exp", str(exp), *args], capture_output=True,
                           text=True, env=env, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        return [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]

    assert not any(" campaign " in c for c in commands())
    run, report = commands("--stage", "8", "--stop-stage", "8")
    assert " campaign run " in run and "conf/campaign.toml" in run
    assert f"--exp {exp}/campaign" in run and f"--tokenizer {exp}/tokenizer.model" in run
    assert " campaign report " in report and "docs/accuracy.md" in report
    # The shipped spec parses and every run's extra arguments are `speechllama train` options.
    protocol, runs = load_spec(ROOT / "recipes" / "synthetic" / "conf" / "campaign.toml")
    assert protocol.steps > 0 and "fsdd-locked" in protocol.exclude
    assert len({r.name for r in runs}) == len(runs) >= 10
    parser = build_parser()
    for run in runs:  # argparse exits (SystemExit) on an unknown option
        parsed = parser.parse_args(["train", "--train", "t", "--out", "o", "--preset", "small",
                                    *protocol.extra, *run.extra])  # fmt: skip
        assert parsed.command == "train"
