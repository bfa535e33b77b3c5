"""Evaluation: WER arithmetic on a hand example, summary keys and sums, the output files, and
failed utterances kept out of the score but counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_transcribe import make_checkpoint, write_wav

from speechllama import DecodingResult, load_model
from speechllama.evaluate import evaluate_manifest, evaluate_results, summarize

torch.set_num_threads(1)

SUMMARY_KEYS = {
    "wer", "substitutions", "deletions", "insertions", "words", "utterances", "decoder_calls",
    "tokens", "encoder_seconds", "decoder_seconds", "audio_seconds", "rtf", "tokens_per_call",
    "calls_per_utt", "failed",
}  # fmt: skip


def test_wer_by_hand():
    refs = ["The cat sat on the mat.", "Hello world", "2 dogs"]
    hyps = ["the cat sat on mat", "hello, there world!", "two hogs"]
    # after normalisation: 1 deletion (the), 1 insertion (there), 1 substitution (dogs->hogs);
    # 6 + 2 + 2 = 10 reference words; "2" and "two" agree because both are normalised
    s = evaluate_results(refs, hyps)
    assert (s["substitutions"], s["deletions"], s["insertions"]) == (1, 1, 1)
    assert s["words"] == 10 and s["hits"] == 8 and s["utterances"] == 3
    assert s["wer"] == pytest.approx(3 / 10)


def test_wer_edge_cases():
    assert evaluate_results([], [])["wer"] == 0.0
    perfect = evaluate_results(["It's 5 o'clock."], ["its five o'clock"])
    assert perfect["substitutions"] == 1  # the normaliser keeps apostrophes inside words
    s = evaluate_results([""], ["extra words"])
    assert s["insertions"] == 2 and s["words"] == 0 and s["wer"] == 2.0
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        evaluate_results(["a", "b"], ["a"])


def _result(text: str, tokens: int, calls: int, enc: float, dec: float, audio: float, **kw):
    return DecodingResult(
        text=text, tokens=tuple(range(tokens)), decoder_calls=calls,
        accepted_per_call=(1, tokens), encoder_seconds=enc, decoder_seconds=dec,
        audio_seconds=audio, **kw,
    )  # fmt: skip


def test_summary_sums_and_ratios():
    results = [
        _result("a b c", 6, 7, 0.1, 0.3, 2.0),
        _result("d e", 4, 5, 0.2, 0.4, 3.0),
        DecodingResult(text="", tokens=(), decoder_calls=0, error="x.wav: file not found"),
    ]
    s = summarize(["a b c", "d f", "never scored"], results, strategy="greedy")
    assert set(s) >= SUMMARY_KEYS
    assert s["failed"] == 1 and s["utterances"] == 2
    assert s["words"] == 5 and s["substitutions"] == 1 and s["wer"] == pytest.approx(0.2)
    assert (s["decoder_calls"], s["tokens"]) == (12, 10)
    assert s["tokens_per_call"] == pytest.approx(10 / 12)
    assert s["calls_per_utt"] == pytest.approx(6.0)
    assert s["accepted_per_call"] == [2, 10]
    assert s["audio_seconds"] == pytest.approx(5.0)
    assert s["rtf"] == pytest.approx(1.0 / 5.0)
    assert s["encoder_rtf"] == pytest.approx(0.3 / 5.0)
    assert s["decoder_rtf"] == pytest.approx(0.7 / 5.0)
    json.dumps(s)  # summary.json must be plain JSON


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_checkpoint(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rows = [
        {"audio_filepath": str(write_wav(root / f"a{i}.wav", d, seed=i)), "text": t, "duration": d}
        for i, (d, t) in enumerate([(0.7, "Hello world"), (0.4, "a stitch in time"), (1.0, "go")])
    ]
    rows.append({"audio_filepath": str(root / "gone.wav"), "text": "lost", "duration": 1.0})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_manifest_writes_consistent_files(model, manifest, tmp_path):
    out = tmp_path / "eval"
    summary = evaluate_manifest(model, manifest, out_dir=out)
    assert set(summary) >= SUMMARY_KEYS
    assert summary == json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    failed = [r for r in rows if "error" in r]
    assert len(failed) == 1 and "gone.wav" in failed[0]["error"]
    assert summary["failed"] == 1 and summary["utterances"] == 3
    scored = [r for r in rows if "error" not in r]
    # the summary is exactly the WER of the written hypotheses against the references
    again = evaluate_results([r["reference"] for r in scored], [r["hypothesis"] for r in scored])
    for key in ("wer", "substitutions", "deletions", "insertions", "words"):
        assert summary[key] == again[key]
    assert summary["words"] == 2 + 4 + 1
    assert summary["decoder_calls"] == sum(r["decoder_calls"] for r in scored)
    assert summary["tokens"] == sum(r["tokens"] for r in scored)
    alignments = (out / "alignments.txt").read_text()
    assert alignments.count("REF:") == 3 and "a0.wav" in alignments
    assert "gone.wav" not in alignments


def test_limit_and_in_memory_utterances(model, manifest, tmp_path):
    from speechllama.data.manifest import load_manifest

    utts = load_manifest(manifest, check_audio=False)
    summary = evaluate_manifest(model, utts, limit=2)
    assert summary["utterances"] == 2 and summary["failed"] == 0
    assert summary["words"] == 2 + 4
