"""The one normaliser and the SentencePiece wrapper."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest

import speechllama.text as text_module
from speechllama.cli import main as cli_main
from speechllama.text import (
    Tokenizer,
    TokenizerError,
    normalize,
    read_lines,
    target_ids,
    train_tokenizer,
)

CASES = [
    # punctuation, case, whitespace
    ("Hello, World!", "hello world"),
    ("tabs\tand\n newlines   here ", "tabs and newlines here"),
    ('say "yes"; or (maybe) no...', "say yes or maybe no"),
    ("well-known state-of-the-art", "well known state of the art"),
    ("rock & roll", "rock and roll"),
    ("", ""),
    ("?!.", ""),
    # apostrophes: kept inside words, dropped at word edges (quotes, plural possessive)
    ("don't  o'clock  it's", "don't o'clock it's"),
    ("'quoted' the boys' toys", "quoted the boys toys"),
    # unicode: curly apostrophes, NFKC ligatures and fractions, letters with diacritics kept
    ("It\u2019s John\u2019s", "it's john's"),
    ("\u2018hi\u2019 \u201chello\u201d", "hi hello"),
    ("\ufb01ne caf\u00e9", "fine caf\u00e9"),
    ("caf\u0065\u0301", "caf\u00e9"),  # decomposed e + combining acute -> composed
    ("\u00bd cup", "one half cup"),
    ("\uff21\uff22\uff23", "abc"),  # full-width letters
    # integers, grouped thousands, leading zeros
    ("Nicklaus had a 70", "nicklaus had a seventy"),
    ("999 and 105 people", "nine hundred ninety nine and one hundred five people"),
    ("25,000 troops", "twenty five thousand troops"),
    ("1,234,567", "one million two hundred thirty four thousand five hundred sixty seven"),
    ("agent 007", "agent zero zero seven"),
    ("mp3 covid19", "mp three covid nineteen"),
    # ordinals
    ("the 1st, 2nd, 3rd and 4th", "the first second third and fourth"),
    ("21st 101st 18TH", "twenty first one hundred first eighteenth"),
    # years and decades
    ("It\u2019s 1865.", "it's eighteen sixty five"),
    ("in 1500 and 1900", "in fifteen hundred and nineteen hundred"),
    ("in 2005 and 2015", "in two thousand five and twenty fifteen"),
    ("mid-1958", "mid nineteen fifty eight"),
    ("the 1990s and the '80s", "the nineteen nineties and the eighties"),
    # decimals, fractions, percent, money, times
    ("pi is 3.14", "pi is three point one four"),
    ("a .38 caliber", "a point three eight caliber"),
    ("1/4 lb, 3/4 and 2/3", "one quarter lb three quarters and two thirds"),
    ("50% off", "fifty percent off"),
    ("$100, $1 and $5.50", "one hundred dollars one dollar and five dollars fifty cents"),
    ("$1.5 million", "one point five million dollars"),
    ("\u00a32", "two pounds"),
    ("at 10:30, 10:05 or 10:00", "at ten thirty ten oh five or ten o'clock"),
    ("John 3:16", "john three sixteen"),
    # titles a TTS voice reads out
    ("Mr. Neild met Mrs. Smith and Dr. Who", "mister neild met missus smith and doctor who"),
    ("St. Paul lived on Main St.", "saint paul lived on main st"),
]


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_normalize_is_idempotent(raw: str, expected: str) -> None:
    assert normalize(expected) == expected
    assert normalize(normalize(raw)) == normalize(raw)


def test_normalize_output_alphabet() -> None:
    rng = random.Random(0)
    pool = "abcXYZ 0123456789.,;:!?'\"-/$%&()\u2019\u201c\u00e9\t\n"
    for _ in range(300):
        out = normalize("".join(rng.choice(pool) for _ in range(rng.randint(0, 40))))
        assert out == out.strip() and "  " not in out
        assert all(c.isalpha() or c in " '" for c in out), out
        assert not any(w.startswith("'") or w.endswith("'") for w in out.split())
        assert normalize(out) == out


def test_training_targets_use_the_one_normaliser(monkeypatch, tokenizer: Tokenizer) -> None:
    """`target_ids` must reach `speechllama.text.normalize` at call time (not a private copy)."""
    calls: list[str] = []
    real = text_module.normalize

    def spy(s: str) -> str:
        calls.append(s)
        return real(s)

    monkeypatch.setattr(text_module, "normalize", spy)
    ids = target_ids("The 2nd Dog!", tokenizer)
    assert calls == ["The 2nd Dog!"]
    assert ids == [*tokenizer.encode("the second dog"), tokenizer.eos_id]
    plain = target_ids("The 2nd Dog!", tokenizer, add_eos=False)
    assert plain == tokenizer.encode("the second dog")


def test_scoring_uses_the_one_normaliser() -> None:
    """The evaluation module must score with this very function, not a look-alike."""
    try:
        evaluate = importlib.import_module("speechllama.evaluate")
    except ModuleNotFoundError as exc:
        if exc.name != "speechllama.evaluate":
            raise
        pytest.skip("speechllama.evaluate not written yet")
    assert evaluate.normalize is text_module.normalize


# --- tokenizer --------------------------------------------------------------------------------

_VOCABULARY = (
    "the a of and to in is was he she it that with for on as his her by at from they this which "
    "be had not but all were when there one two three twenty first hundred thousand don't "
    "o'clock speech model decoder audio tokens quick brown fox jumps over lazy dog"
)
_WORDS = _VOCABULARY.split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(_sentences(400), path, vocab_size=80)


def test_tokenizer_special_ids_and_size(tokenizer: Tokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tokenizer.vocab_size == 80


def test_tokenizer_round_trip(tokenizer: Tokenizer) -> None:
    for sentence in [*_sentences(50, seed=1), normalize("The 3rd of May, 1865: don't stop!")]:
        ids = tokenizer.encode(sentence)
        assert ids and all(4 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == sentence
        # specials are skipped, so a decoder output with BOS/EOS/padding decodes the same
        assert tokenizer.decode([1, *ids, 2, 0, 0]) == sentence


def test_tokenizer_save_load_and_proto(tokenizer: Tokenizer, tmp_path: Path) -> None:
    sentence = "the quick brown fox"
    tokenizer.save(tmp_path / "t.model")
    loaded = Tokenizer.load(tmp_path / "t.model")
    assert loaded.model_proto == tokenizer.model_proto
    assert loaded.encode(sentence) == tokenizer.encode(sentence)
    assert Tokenizer(tokenizer.model_proto).encode(sentence) == tokenizer.encode(sentence)


def test_tokenizer_unknown_character_is_unk(tokenizer: Tokenizer) -> None:
    assert tokenizer.unk_id in tokenizer.encode("the \u00df dog")


def test_tokenizer_decode_rejects_out_of_range(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([5, tokenizer.vocab_size])


def test_train_from_path_normalises(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join(s.upper() + "!" for s in _sentences(300)) + "\n", encoding="utf-8")
    tok = train_tokenizer(raw, tmp_path / "t.model", vocab_size=60, model_type="bpe")
    assert (tmp_path / "t.model").exists()
    # uppercase and "!" never reached the trainer: no piece contains them
    pieces = [tok.id_to_piece(i) for i in range(4, tok.vocab_size)]
    assert not any(any(c.isupper() or c == "!" for c in p) for p in pieces)


def test_train_vocab_too_large_is_clear(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"big\.model: tokenizer training failed"):
        train_tokenizer(_sentences(5), tmp_path / "big.model", vocab_size=5000)


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    import sentencepiece as spm

    with pytest.raises(TokenizerError, match=r"missing\.model: cannot read"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a SentencePiece model"):
        Tokenizer.load(junk)
    # a model trained with SentencePiece's default ids (unk 0, bos 1, eos 2, no pad)
    plain = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(300)),
        model_prefix=str(plain),
        vocab_size=60,
        minloglevel=2,
    )
    with pytest.raises(TokenizerError, match=r"plain\.model: special ids"):
        Tokenizer.load(f"{plain}.model")


def test_read_lines_gz_and_errors(tmp_path: Path) -> None:
    import gzip

    gz = tmp_path / "a.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("one\ntwo\n")
    assert list(read_lines(gz)) == ["one\n", "two\n"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8"):
        list(read_lines(bad))
    with pytest.raises(OSError, match=r"nope\.txt: cannot read"):
        list(read_lines(tmp_path / "nope.txt"))


def test_cli_tokenizer_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(_sentences(200, seed=2)), encoding="utf-8")
    b.write_text("\n".join(_sentences(200, seed=3)), encoding="utf-8")
    out = tmp_path / "sub" / "tok.model"
    args = ["tokenizer", "train", "--text", str(a), str(b), "--vocab-size", "70", "--out", str(out)]
    assert cli_main(args) == 0
    assert Tokenizer.load(out).vocab_size == 70
    assert "vocab size 70" in capsys.readouterr().out
    bad = ["tokenizer", "train", "--text", str(tmp_path / "none.txt"), "--vocab-size", "70"]
    assert cli_main([*bad, "--out", str(out)]) == 1
    assert "none.txt: cannot read" in capsys.readouterr().err
