"""The peers bench (speechllama.bench_peers + scripts/peers.py): WER and RTF bookkeeping on
stand-in systems, the turn-taking order, our model's row against ``evaluate_manifest``, and the
real peers on two bundled clips when they are installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_transcribe import make_checkpoint, write_wav

from speechllama import DecodingOptions, load_model
from speechllama.assets import example_manifest
from speechllama.bench_peers import (
    EvalSet,
    format_table,
    load_set,
    run_set,
    short_source,
    to_json,
)
from speechllama.evaluate import evaluate_manifest, evaluate_results
from speechllama.peers import Hypothesis, OurModel

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("peers_script", ROOT / "scripts" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers_script"] = module
    spec.loader.exec_module(module)
    return module


class Scripted:
    """A stand-in system: fixed answers by utterance length and 0.5 s per second of audio;
    records every call, so the test can see warm-up and turn order."""

    threads = 3

    def __init__(self, name: str, answers: dict[int, str], calls: list[tuple[str, int]]) -> None:
        self.name = name
        self.answers = answers
        self.calls = calls

    def transcribe(self, waves):
        self.calls.append((self.name, len(waves)))
        out = []
        for w in waves:
            text = self.answers[w.shape[0]]
            error = "boom" if text == "<fail>" else None
            out.append(Hypothesis(text, 0.5 * w.shape[0] / 16000, error))
        return out


def _set() -> EvalSet:
    lengths = [16000, 8000, 24000, 32000, 4000]
    waves = tuple(np.zeros(n, dtype=np.float32) for n in lengths)
    refs = ("one two three", "four", "Five, six!", "seven eight", "nine")
    sources = ("A (via x)", "A (via y)", "B", "B", "A (via x)")
    return EvalSet("toy", waves, refs, tuple(short_source(s) for s in sources), ())


def test_rows_score_like_evaluate_and_time_like_rtf():
    data = _set()
    calls: list[tuple[str, int]] = []
    hyps = ["one two three", "for", "five six", "<fail>", "nine nine"]
    good = Scripted(
        "good", {w.shape[0]: r for w, r in zip(data.waves, data.refs, strict=True)}, calls
    )
    bad = Scripted("bad", {w.shape[0]: h for w, h in zip(data.waves, hyps, strict=True)}, calls)
    rows, errors = run_set([good, bad], data, chunk=2, by_source=True)

    assert [(r.system, r.set) for r in rows] == [
        ("good", "toy"),
        ("bad", "toy"),
        ("good", "toy/A"),
        ("bad", "toy/A"),
        ("good", "toy/B"),
        ("bad", "toy/B"),
    ]
    good_row, bad_row = rows[0], rows[1]
    assert good_row.wer == 0.0 and good_row.utterances == 5 and good_row.failed == 0
    assert good_row.threads == 3
    # The failed utterance (index 3) is left out of WER and of the audio and seconds.
    kept = [0, 1, 2, 4]
    ref = evaluate_results([data.refs[i] for i in kept], [hyps[i] for i in kept])
    assert bad_row.wer == pytest.approx(ref["wer"]) and bad_row.words == ref["words"]
    assert (bad_row.utterances, bad_row.failed) == (4, 1)
    audio = sum(data.waves[i].shape[0] for i in kept) / 16000
    assert bad_row.audio_seconds == pytest.approx(audio)
    assert bad_row.rtf == pytest.approx(0.5)  # the stand-in spends 0.5 s per audio second
    assert errors == ["bad: toy: boom"]
    # Per source: A = utterances 0, 1, 4 (provenance stripped); B = 2, 3.
    assert rows[2].utterances == 3 and rows[4].utterances == 2
    a_refs, a_hyps = [data.refs[i] for i in (0, 1, 4)], [hyps[i] for i in (0, 1, 4)]
    assert rows[3].wer == pytest.approx(evaluate_results(a_refs, a_hyps)["wer"]) == 2 / 5

    # One untimed warm-up each, then chunks of 2 with the first turn rotating.
    assert calls == [
        ("good", 1),
        ("bad", 1),
        ("good", 2),
        ("bad", 2),
        ("bad", 2),
        ("good", 2),
        ("good", 1),
        ("bad", 1),
    ]


def test_table_and_json_hold_every_row():
    data = _set()
    calls: list[tuple[str, int]] = []
    sys_ = Scripted("only", {w.shape[0]: "x" for w in data.waves}, calls)
    rows, errors = run_set([sys_], data, chunk=10)
    head = {"cpu": "cpu", "python": "3", "versions": {"torch": "t"}, "chunk": 10}
    table = format_table(rows, head)
    assert "only" in table and "toy" in table and f"{100 * rows[0].wer:6.2f}%" in table
    doc = json.loads(json.dumps(to_json(rows, head, errors)))
    assert doc["rows"][0]["system"] == "only" and doc["header"]["chunk"] == 10
    with pytest.raises(ValueError, match="chunk"):
        run_set([sys_], data, chunk=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    ckpt = make_checkpoint(root)
    rows = []
    for i, seconds in enumerate([0.7, 0.4, 1.0]):
        path = write_wav(root / f"u{i}.wav", seconds, seed=i)
        rows.append({"audio_filepath": str(path), "text": "the early bird", "duration": seconds})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt, manifest


def test_our_row_matches_evaluate_manifest(tiny):
    ckpt, manifest = tiny
    model = load_model(ckpt)
    options = DecodingOptions(batch_size=1, max_tokens_per_second=4)
    rows, _ = run_set([OurModel(model, options)], load_set("tiny", manifest), chunk=2)
    summary = evaluate_manifest(model, manifest, options, head_accuracy=False)
    assert rows[0].wer == pytest.approx(summary["wer"])
    assert rows[0].words == summary["words"] and rows[0].utterances == summary["utterances"]
    assert rows[0].audio_seconds == pytest.approx(summary["audio_seconds"], rel=1e-4)


def test_script_runs_our_model_without_peers(tiny, tmp_path, capsys):
    ckpt, manifest = tiny
    out = tmp_path / "peers.json"
    script = _script()
    rc = script.main(
        [
            "--systems",
            "",
            "--model",
            str(ckpt),
            "--threads",
            "1",
            "--encoder-dtype",
            "float32",
            "--max-tokens-per-second",
            "4",
            "--json",
            str(out),
            f"mine={manifest}",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    name = f"speechllama {ckpt.parent.name}/{ckpt.name}"
    assert [(r["system"], r["set"]) for r in doc["rows"]] == [(name, "mine")]
    assert "speechllama" in capsys.readouterr().out
    assert script.main(["--systems", "nope", str(manifest)]) == 1
    assert script.main(["--systems", "", str(manifest)]) == 1  # nothing to run


def test_isolated_run_gives_the_same_rows_from_a_fresh_process(tiny, tmp_path):
    """--isolate runs each system in a spawned process of its own: same transcripts, so the
    same WER, and the table says how it ran."""
    ckpt, manifest = tiny
    script = _script()
    common = ["--systems", "", "--model", str(ckpt), "--threads", "1",
              "--max-tokens-per-second", "4", f"mine={manifest}"]  # fmt: skip
    docs = []
    for extra in ([], ["--isolate"]):
        out = tmp_path / f"peers{len(extra)}.json"
        assert script.main([*common, *extra, "--json", str(out)]) == 0
        docs.append(json.loads(out.read_text()))
    shared, isolated = docs
    assert [r["wer"] for r in isolated["rows"]] == [r["wer"] for r in shared["rows"]]
    assert [r["system"] for r in isolated["rows"]] == [r["system"] for r in shared["rows"]]
    assert isolated["header"]["isolated"] and not shared["header"]["isolated"]


def test_default_sets_are_named_after_their_folders():
    script = _script()
    args = script.parse_args(["--data", "D"])
    assert script.named_manifests(args) == [
        ("real-smoke", Path("D/real-smoke/manifest.jsonl")),
        ("fsdd-test", Path("D/fsdd-test/manifest.jsonl")),
    ]
    args = script.parse_args(["x/set1/manifest.jsonl", "n=y.jsonl"])
    assert script.named_manifests(args) == [
        ("set1", Path("x/set1/manifest.jsonl")),
        ("n", Path("y.jsonl")),
    ]
    assert args.batch_size == 1


def test_digit_grammar_peer_says_only_digits(tmp_path):
    pytest.importorskip("pocketsphinx")
    from speechllama.peers import build_peers

    rows = [json.loads(line) for line in example_manifest().read_text().splitlines()]
    digits = [r for r in rows if r["text"].isalpha() and len(r["text"].split()) == 1]
    for r in digits:
        r["audio_filepath"] = str(example_manifest().parent / r["audio_filepath"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in digits))
    (system,) = build_peers(["pocketsphinx-digits"])
    data = load_set("digits", manifest)
    hyps = system.transcribe(data.waves)
    words = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert len(hyps) == 6 and all(h.text in words for h in hyps)


@pytest.mark.parametrize("peer", ["faster-whisper", "pocketsphinx"])
def test_real_peer_on_a_bundled_clip(peer, tmp_path):
    pytest.importorskip(peer.replace("-", "_"))
    from speechllama.peers import build_peers

    rows = [json.loads(line) for line in example_manifest().read_text().splitlines()]
    lj = next(r for r in rows if r["audio_filepath"].endswith("LJ001-0002.flac"))
    lj["audio_filepath"] = str(example_manifest().parent / lj["audio_filepath"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(lj) + "\n")
    (system,) = build_peers([peer], threads=1)
    (row,), errors = run_set([system], load_set("lj", manifest))
    assert errors == [] and row.utterances == 1 and row.rtf > 0
    # "in being comparatively modern.": Whisper gets it right; pocketsphinx most of it.
    assert row.wer <= (0.0 if peer == "faster-whisper" else 0.5)
