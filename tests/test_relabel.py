"""Self-distillation relabelling: greedy hypotheses become the training transcripts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from speechllama.cli import main as cli_main
from speechllama.data.manifest import Utterance, load_manifest, write_manifest
from speechllama.data.relabel import relabel
from speechllama.text import EOS_ID, train_tokenizer
from speechllama.train.data import utterance_targets
from speechllama.train.hidden import HiddenCache


def _utts() -> list[Utterance]:
    return [
        Utterance("/a.wav", "The cat sat", 1.5, id="a", extra={"speed": 0.9}),
        Utterance("/b.wav", "a dog", 2.0, id="b"),
        Utterance("/c.wav", "silence here", 1.0, id="c"),
        Utterance("/d.wav", "no hypothesis", 3.0, id="d"),
    ]


def _hyps() -> list[dict[str, object]]:
    return [
        {"key": "a", "hypothesis": "the cat sat"},  # differs only in case: not "changed"
        {"key": "b", "hypothesis": "a dock"},
        {"key": "b", "hypothesis": "a dog's "},  # a resumed log's later row wins
        {"key": "c", "hypothesis": " "},
        {"key": "zzz", "hypothesis": "not in the manifest"},
    ]


def test_relabel_replaces_text_keeps_the_reference_and_counts() -> None:
    kept, stats = relabel(_utts(), _hyps())
    assert [u.id for u in kept] == ["a", "b"]
    assert [u.text for u in kept] == ["the cat sat", "a dog's"]
    assert kept[0].extra == {"speed": 0.9, "reference_text": "The cat sat"}
    assert kept[1].extra["reference_text"] == "a dog"
    assert (stats.kept, stats.changed, stats.empty, stats.missing) == (2, 1, 1, 1)
    assert stats.hours == pytest.approx(3.5 / 3600)
    # A second pass keeps the first reference, not the first pass's hypothesis.
    again, _ = relabel(kept, [{"key": "a", "hypothesis": "a cat"}])
    assert again[0].extra["reference_text"] == "The cat sat"


def test_cli_relabel_writes_a_loadable_manifest(tmp_path: Path) -> None:
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out" / "self.jsonl"
    write_manifest(_utts(), manifest, relative=False)
    ev = tmp_path / "eval"
    ev.mkdir()
    rows = "".join(json.dumps(r) + "\n" for r in _hyps())
    (ev / "hypotheses.jsonl").write_text(rows + '{"key": "torn', encoding="utf-8")
    assert cli_main(["data", "relabel", str(manifest), str(ev), "--out", str(out)]) == 0
    got = load_manifest(out, check_audio=False)
    assert [(u.id, u.text, u.extra["reference_text"]) for u in got] == [
        ("a", "the cat sat", "The cat sat"),
        ("b", "a dog's", "a dog"),
    ]


def test_cli_relabel_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.jsonl"
    write_manifest(_utts(), manifest, relative=False)
    out = tmp_path / "self.jsonl"
    assert (
        cli_main(["data", "relabel", str(manifest), str(tmp_path / "nope"), "--out", str(out)]) == 1
    )
    assert "nope: no such hypotheses file" in capsys.readouterr().err
    hyps = tmp_path / "h.jsonl"
    hyps.write_text(json.dumps({"key": "other", "hypothesis": "x"}) + "\n", encoding="utf-8")
    assert cli_main(["data", "relabel", str(manifest), str(hyps), "--out", str(out)]) == 1
    assert "no hypothesis matches a row" in capsys.readouterr().err
    assert not out.exists()


def test_relabel_carries_the_greedy_ids_and_replaces_old_ones() -> None:
    utts = [Utterance("/a.wav", "a cat", 1.0, id="a", extra={"token_ids": [9, 9]})]
    kept, _ = relabel(utts, [{"key": "a", "hypothesis": "a hat", "token_ids": [5, 6, 7]}])
    assert kept[0].extra["token_ids"] == [5, 6, 7]
    kept, _ = relabel(utts, [{"key": "a", "hypothesis": "a hat"}])
    assert "token_ids" not in kept[0].extra


def test_trainer_uses_row_ids_only_when_they_spell_the_text(tmp_path: Path) -> None:
    text = ["the cat sat on the mat", "a dog ran to the hat", "then the cats sat"] * 20
    tok = train_tokenizer(text, tmp_path / "t.model", vocab_size=20)
    canonical = tok.encode("the cat")
    piece = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    # "the cat" letter by letter: not the canonical tokenisation, but it spells the text.
    odd = [piece["\u2581"], piece["t"], piece["h"], piece["e"], *tok.encode(" cat")]
    assert odd != canonical and tok.decode(odd) == "the cat"
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")  # the cache key reads the file's size and time, not its audio
    row = Utterance(str(wav), "The cat", 1.0, extra={"token_ids": odd})
    assert utterance_targets(row, tok) == [*odd, EOS_ID]
    for bad in ([*canonical, *canonical], [10_000], [EOS_ID, *canonical], "12", []):
        other = Utterance("/a.wav", "the cat", 1.0, extra={"token_ids": bad})
        assert utterance_targets(other, tok) == [*canonical, EOS_ID], bad
    cache = HiddenCache.__new__(HiddenCache)  # key() reads nothing but its arguments
    plain = dataclasses.replace(row, extra={})
    assert cache.key(row, 0) != cache.key(plain, 0)
    assert cache.key(plain, 0) == cache.key(Utterance(str(wav), "The cat", 1.0), 0)
