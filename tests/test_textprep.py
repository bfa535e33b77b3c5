"""Text preparation: splitting, dedupe, test-set exclusion, deterministic hold-out."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from speechllama.cli import main as cli_main
from speechllama.data.textprep import (
    TextPrepOptions,
    prepare_sentences,
    prepare_text,
    read_corpus,
    read_test_sentences,
    split_sentence,
)


def _token(i: int) -> str:
    """A distinct letters-only word for each i (digits would be spelled out by normalize)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i % 26] + letters[(i // 26) % 26] + letters[i // 676]


def _words(n: int, word: str = "w") -> str:
    return " ".join(f"{word}{_token(i)}" for i in range(n))


def test_short_sentences_are_normalised_whole() -> None:
    assert split_sentence("In 1865, Mr. Smith left!", max_words=24) == (
        ["in eighteen sixty five mister smith left"],
        0,
    )
    assert split_sentence("Hi.", min_words=2) == ([], 0)
    assert split_sentence("", min_words=1) == ([], 0)


def test_long_sentences_split_at_clauses_and_pack_greedily() -> None:
    raw = f"{_words(6, 'a')}; {_words(5, 'b')}, {_words(4, 'c')}: {_words(7, 'd')}."
    pieces, dropped = split_sentence(raw, max_words=12)
    assert dropped == 0
    # clauses (a 6; b 5 + c 4 which fits, so its comma is no split point; d 7) are packed
    # greedily, and 6 + 9 or 9 + 7 would exceed 12
    assert pieces == [_words(6, "a"), f"{_words(5, 'b')} {_words(4, 'c')}", _words(7, "d")]
    assert all(len(p.split()) <= 12 for p in pieces)
    short = f"{_words(3, 'a')}; {_words(3, 'b')}! {_words(3, 'c')}? {_words(8, 'd')}."
    three = f"{_words(3, 'a')} {_words(3, 'b')} {_words(3, 'c')}"
    assert split_sentence(short, max_words=10) == ([three, _words(8, "d")], 0)
    # the words are all there, in order: splitting loses nothing but punctuation
    assert (
        " ".join(pieces).split()
        == raw.replace(";", "").replace(",", "").replace(":", "").replace(".", "").split()
    )


def test_clause_too_long_is_dropped_and_abbreviations_do_not_split() -> None:
    raw = f"{_words(30, 'x')}. Then Mr. Brown came home, {_words(3, 'y')}."
    pieces, dropped = split_sentence(raw, max_words=10)
    assert dropped == 1
    assert pieces == [f"then mister brown came home {_words(3, 'y')}"]
    # a clause over the limit with commas falls back to comma splits
    raw = f"{_words(8, 'p')}, {_words(8, 'q')}, {_words(8, 'r')}"
    expected = [_words(8, "p"), _words(8, "q"), _words(8, "r")]
    assert split_sentence(raw, max_words=10) == (expected, 0)


def test_dedupe_after_normalisation_and_counts() -> None:
    corpus = ["Hello, world!", "hello world", "HELLO   WORLD.", "Second line here", "x", ""]
    splits, stats = prepare_sentences(corpus, options=TextPrepOptions(heldout_size=0, dev_size=0))
    assert splits.train == ("hello world", "second line here")
    assert (stats.lines, stats.duplicates, stats.dropped_short, stats.train) == (6, 2, 2, 2)


def test_test_sentences_excluded_exactly_and_by_containment() -> None:
    tests = [
        "The 2nd test sentence.",  # exact, after normalisation
        "a b c d e f g h i j k l m n o p",  # long: its split pieces must go too
        "inner part of it",  # contained in a longer training sentence
        "five",  # one word: only exact matches count (FSDD digits)
    ]
    corpus = [
        "the second test sentence",
        "a b c d e f g h i j k l m n o p",  # whole line, excluded before splitting
        "a b c d e f g h",  # a piece of a test sentence (>= overlap_words)
        "this has the inner part of it inside",
        "five",
        "five little ducks",  # contains the one-word test sentence: kept
        "keep me please",
    ]
    options = TextPrepOptions(max_words=10, heldout_size=0, dev_size=0)
    splits, stats = prepare_sentences(corpus, tests, options)
    assert splits.train == ("five little ducks", "keep me please")
    assert stats.in_test_sets == 5


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [_token(i) for i in range(200)]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 10))) for _ in range(n)]


def test_holdout_is_deterministic_disjoint_and_stable() -> None:
    corpus = _corpus(3000)
    options = TextPrepOptions(heldout_size=500, dev_size=200, seed=7)
    a, stats = prepare_sentences(corpus, options=options)
    b, _ = prepare_sentences(list(corpus), options=options)
    assert a == b
    assert (len(a.heldout), len(a.dev)) == (500, 200) and stats.heldout == 500
    held, dev, train = set(a.heldout), set(a.dev), set(a.train)
    assert not (held & dev) and not (held & train) and not (dev & train)
    assert len(held | dev | train) == len(set(corpus)) == stats.train + 700
    # train keeps corpus order
    order = {s: i for i, s in enumerate(corpus)}
    assert [order[s] for s in a.train] == sorted(order[s] for s in a.train)
    # another seed holds out other sentences
    c, _ = prepare_sentences(corpus, options=TextPrepOptions(heldout_size=500, seed=8))
    assert len(held & set(c.heldout)) < 100
    # adding a corpus never moves an old sentence *into* the held-out set
    more, _ = prepare_sentences(corpus + _corpus(1000, seed=1), options=options)
    assert set(more.heldout) & set(corpus) <= held


def test_holdout_smaller_pool_than_asked() -> None:
    options = TextPrepOptions(heldout_size=20, dev_size=20)
    splits, _ = prepare_sentences(_corpus(30), options=options)
    assert (len(splits.heldout), len(splits.dev), len(splits.train)) == (20, 10, 0)


def test_readers(tmp_path: Path) -> None:
    tsv = tmp_path / "lj.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as f:
        f.write("LJ1\tFirst line.\nLJ2\tSecond, line\n")
    assert list(read_corpus(tsv)) == ["First line.", "Second, line"]
    plain = tmp_path / "p.txt"
    plain.write_text("a\tb\nc\n", encoding="utf-8")
    assert list(read_corpus(plain)) == ["a\tb", "c"]
    manifest_tsv = tmp_path / "manifest.tsv"
    manifest_tsv.write_text('id\tpath\ttext\n1\ta.wav\tHe said "hi"\n', encoding="utf-8")
    assert read_test_sentences(manifest_tsv) == ['He said "hi"']
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert read_test_sentences(jsonl) == ["one", "two"]
    jsonl.write_text('{"text": "one"}\n{"no": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a manifest row"):
        read_test_sentences(jsonl)
    assert read_test_sentences(plain) == ["a\tb", "c"]


def test_prepare_text_files_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt.gz"
    lines = [*_corpus(400), "The 3rd of May.", "the third of may"]
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    test_set = tmp_path / "test.jsonl"
    test_set.write_text(json.dumps({"text": lines[5]}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    options = TextPrepOptions(heldout_size=50, dev_size=20)
    stats = prepare_text([corpus], out, exclude_paths=[test_set], options=options)
    files = {
        name: (out / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        for name in ("train", "dev", "heldout")
    }
    assert (len(files["heldout"]), len(files["dev"]), len(files["train"])) == (50, 20, stats.train)
    everything = [s for part in files.values() for s in part]
    assert lines[5] not in everything and everything.count("the third of may") == 1
    info = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert info["stats"]["in_test_sets"] == 1 and info["test_sentences"] == 1

    out2 = tmp_path / "out2"
    args = ["data", "prepare-text", str(corpus), "--out", str(out2), "--exclude", str(test_set)]
    assert cli_main([*args, "--heldout", "50", "--dev", "20"]) == 0
    assert (out2 / "heldout.txt").read_text() == (out / "heldout.txt").read_text()
    assert "50 heldout sentences" in capsys.readouterr().out
    assert cli_main([*args, "--min-words", "5", "--max-words", "3"]) == 1
    assert "--min-words" in capsys.readouterr().err
