"""`speechllama tokenizer`: train the SentencePiece model the decoder writes with."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a SentencePiece tokenizer on normalised text",
        description="SentencePiece tokenizer with the project's special ids "
        "(pad 0, bos 1, eos 2, unk 3).",
    )
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser(
        "train",
        help="train a tokenizer model from text files",
        description="Train a SentencePiece model. Every line of every file is one sentence; "
        "it is passed through speechllama's normaliser first (a no-op on the output of "
        "`speechllama data prepare-text`). Character coverage is 1.0.",
        epilog="example: speechllama tokenizer train --text data/text/train.txt "
        "--vocab-size 1000 --out data/tokenizer.model",
    )
    train.add_argument(
        "--text",
        nargs="+",
        required=True,
        type=Path,
        metavar="FILE",
        help="text files, one sentence per line (.gz allowed)",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="number of pieces, the 4 special ids included",
    )
    train.add_argument(
        "--out", type=Path, required=True, metavar="PATH", help="where to write the .model file"
    )
    train.add_argument(
        "--model-type",
        choices=("unigram", "bpe", "char", "word"),
        default="unigram",
        help="SentencePiece model type (default: %(default)s)",
    )
    train.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        metavar="N",
        help="sample at most N sentences for training (default: %(default)s)",
    )
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from speechllama.text import read_lines, train_tokenizer

    if args.vocab_size < 5:
        raise ValueError(f"--vocab-size {args.vocab_size}: must be at least 5 (4 special ids)")
    lines = itertools.chain.from_iterable(read_lines(p) for p in args.text)
    tokenizer = train_tokenizer(
        lines, args.out, args.vocab_size, args.model_type, max_sentences=args.max_sentences
    )
    print(f"wrote {args.out} (vocab size {tokenizer.vocab_size}, {args.model_type})")
    return 0
