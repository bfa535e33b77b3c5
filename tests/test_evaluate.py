"""Evaluation: WER arithmetic on a hand example, summary keys and sums, the output files,
failed utterances kept out of the score but counted, and each head's teacher-forced accuracy
against a position-by-position reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_transcribe import make_checkpoint, write_wav

from speechllama import DecodingOptions, DecodingResult, load_model
from speechllama.audio import load_audio
from speechllama.checkpoint import save_checkpoint
from speechllama.cli import main
from speechllama.data.manifest import load_manifest
from speechllama.evaluate import evaluate_manifest, evaluate_results, summarize
from speechllama.features import compute_features
from speechllama.model.config import HeadsConfig, preset
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import target_ids
from speechllama.train.data import SpeechDataset, collate
from speechllama.train.step import compute_loss

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


# --- teacher-forced per-head accuracy -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, manifest) -> Path:
    """A K = 2 projection model overfit a little on the manifest's decodable utterances, so its
    heads' accuracies are neither 0 nor 1 and differ."""
    root = tmp_path_factory.mktemp("trained")
    tok = load_model(make_checkpoint(root)).tokenizer
    torch.manual_seed(0)
    cfg = preset("tiny", tok.vocab_size).replace(heads=HeadsConfig(kind="projection", num_heads=2))
    model = SpeechLLaMA(cfg)
    utts = [
        u for u in load_manifest(manifest, check_audio=False) if Path(u.audio_filepath).exists()
    ]
    data = SpeechDataset(utts, tok)
    batch = collate([data[i] for i in range(len(data))])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = compute_loss(model, batch).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(model.eval(), tok, root / "k2")


def _decodable(manifest: Path) -> list:
    return [
        u for u in load_manifest(manifest, check_audio=False) if Path(u.audio_filepath).exists()
    ]


def _reference_head_accuracy(transcriber, utts) -> tuple[list[int], list[int]]:
    """Hits, scored positions and summed cross-entropy (nats) per head, one utterance at a
    time, position by position."""
    model = transcriber.model
    hits, scored, ce = [0, 0], [0, 0], [0.0, 0.0]
    for utt in utts:
        ids = target_ids(utt.text, transcriber.tokenizer)  # y EOS
        feats = compute_features(load_audio(utt.audio_filepath), "fbank", 80)[None]
        with torch.no_grad():
            emb, lens = model.encode(feats, torch.tensor([feats.shape[1]]))
            tokens = torch.tensor([[1, *ids[:-1]]])  # BOS y
            logits = model(emb, lens, tokens, torch.tensor([len(ids)]))
        for u in range(len(ids)):  # input position u reads BOS y_1 .. y_u
            for k in range(2):  # head k + 1 predicts the token k + 1 places ahead
                if u + k < len(ids):
                    scored[k] += 1
                    hits[k] += int(logits[0, u, k].argmax()) == ids[u + k]
                    ce[k] -= float(logits[0, u, k].float().log_softmax(-1)[ids[u + k]])
    return hits, scored, ce


def test_head_accuracy_is_the_teacher_forced_hit_rate_of_each_head(trained, manifest):
    # fp32 encoder: a bf16 one (the default on AMX CPUs) rounds a padded batch differently
    model = load_model(trained, encoder_precision="float32")
    utts = [
        u for u in load_manifest(manifest, check_audio=False) if Path(u.audio_filepath).exists()
    ]
    hits, scored, ce = _reference_head_accuracy(model, utts)
    for batch_size in (1, 3):  # padding in a batch must not change a thing
        s = evaluate_manifest(model, manifest, DecodingOptions(batch_size=batch_size))
        assert s["head_accuracy_tokens"] == scored
        assert s["head_accuracy"] == pytest.approx(
            [h / n for h, n in zip(hits, scored, strict=True)]
        )
        assert s["head_ce"] == pytest.approx([c / n for c, n in zip(ce, scored, strict=True)])
        assert s["head_accuracy_skipped"] == []  # the missing file failed; it is not "skipped"
    accuracy = s["head_accuracy"]
    assert all(0 < a < 1 for a in accuracy) and accuracy[0] != accuracy[1], accuracy  # non-trivial
    # y EOS of the three references: 2 + 4 + 1 words, each head scores one fewer per utterance
    lengths = [len(target_ids(u.text, model.tokenizer)) for u in utts]
    assert scored == [sum(lengths), sum(lengths) - len(lengths)]
    assert "head_accuracy" not in evaluate_manifest(model, utts, head_accuracy=False)


def test_evaluate_command_reports_head_accuracy_and_notes_untokenisable_references(
    trained, manifest, tmp_path, capsys
):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    copy = shutil.copy(rows[0]["audio_filepath"], tmp_path / "cafe.wav")
    rows.append({**rows[0], "audio_filepath": str(copy), "text": "café au lait"})  # é: <unk>
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    code = main(["evaluate", str(path), "--model", str(trained), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["head_accuracy"]) == 2 and summary["utterances"] == 4
    skipped = summary["head_accuracy_skipped"]
    assert [s["audio_filepath"] for s in skipped] == [str(copy)]
    assert "<unk>" in skipped[0]["reason"]
    assert "not in head_accuracy" in captured.err and "cafe.wav" in captured.err
    acc = "/".join(f"{100 * a:.1f}" for a in summary["head_accuracy"])
    assert f"head acc {acc}%" in captured.out
    # the three tokenisable references score exactly as on their own
    alone = evaluate_manifest(load_model(trained), manifest)
    assert summary["head_accuracy_tokens"] == alone["head_accuracy_tokens"]
    assert main(["evaluate", str(path), "--model", str(trained), "--out", str(out),
                 "--no-head-accuracy"]) == 0  # fmt: skip
    assert "head_accuracy" not in json.loads((out / "summary.json").read_text())
