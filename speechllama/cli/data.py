"""`speechllama data`: import shared manifests, prepare training text, validate manifests, and
synthesize speech (the synthesis options live in ``speechllama.data.synth``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_PROG = "speechllama data"

_EXAMPLES = """\
examples:
  speechllama data import-tsv /work/shared/data/fsdd/manifest.tsv --out data/manifests
  speechllama data prepare-text /work/shared/data/text/*.gz --out data/text \\
      --exclude /work/shared/data/real_en_smoke/manifest.tsv
  speechllama data synth --text data/text/train.txt --out data/synth_train --hours 10
  speechllama data validate data/synth_train/manifest.jsonl
  speechllama evaluate data/train.jsonl --no-head-accuracy --out exp/pl
  speechllama data relabel data/train.jsonl exp/pl --out data/train_self.jsonl
  apt-get download asterisk-core-sounds-en-wav asterisk-core-sounds-en  # then dpkg-deb -x each
  speechllama data asterisk extracted/ --out data/asterisk-locked
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare data: import manifests, prepare text, synthesize, validate",
        description="Data preparation. Manifests are NeMo JSONL: one object per line with "
        "audio_filepath (relative paths resolve against the manifest's folder), text, "
        "duration, and optional speaker, voice, source, id, offset.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _add_import_tsv(sub)
    _add_prepare_text(sub)
    _add_validate(sub)
    _add_synth(sub)
    _add_relabel(sub)
    _add_asterisk(sub)


def _add_import_tsv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-tsv",
        help="convert shared manifest.tsv files to JSONL manifests",
        description="Convert manifest.tsv files (columns path and text required; id, split, "
        "speaker, source used; other columns kept as extra keys) to NeMo JSONL. A split column "
        "gives one manifest per split (FSDD: NAME_train.jsonl, NAME_test.jsonl), otherwise "
        "NAME.jsonl. Durations are read from the audio headers; a bare-number transcript (an "
        "FSDD label) becomes its word. By default audio is not copied: rows hold absolute "
        "paths to the files next to the TSV. Bad rows are reported and skipped; the exit "
        "code is 1 if there were any.",
    )
    p.add_argument("tsv", nargs="+", type=Path, metavar="TSV", help="manifest.tsv file(s)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--name", help="manifest name (default: the TSV's folder name); only with one TSV"
    )
    p.add_argument(
        "--copy-audio",
        action="store_true",
        help="copy the audio under DIR/NAME/ and write relative paths (a self-contained folder)",
    )
    p.set_defaults(func=_import_tsv)


def _add_prepare_text(sub: argparse._SubParsersAction) -> None:
    from speechllama.data.textprep import TextPrepOptions

    d = TextPrepOptions()
    p = sub.add_parser(
        "prepare-text",
        help="normalise corpora, split long sentences, deduplicate, divide into train/dev/heldout",
        description="Turn text corpora into sentence lists for synthesis: normalise every "
        "line with the project's one normaliser, split sentences longer than --max-words at "
        "clause punctuation (clauses still too long are dropped), drop pieces shorter than "
        "--min-words, deduplicate, drop every sentence found in the --exclude test sets, and "
        "hold out --heldout sentences (the synthetic test set) and --dev sentences, chosen by "
        "a hash of (seed, sentence): deterministic, and stable when corpora are added. "
        "Writes DIR/train.txt, DIR/dev.txt, DIR/heldout.txt and DIR/stats.json.",
    )
    p.add_argument(
        "corpus",
        nargs="+",
        type=Path,
        metavar="CORPUS",
        help="text files, one sentence per line (.gz allowed; in .tsv files the last column)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--exclude",
        nargs="*",
        type=Path,
        default=[],
        metavar="FILE",
        help="test sets whose sentences must not be trained on: manifest.tsv (text column), "
        "JSONL manifests (text key) or plain text files",
    )
    p.add_argument("--max-words", type=int, default=d.max_words, help="default %(default)s")
    p.add_argument("--min-words", type=int, default=d.min_words, help="default %(default)s")
    p.add_argument(
        "--heldout", type=int, default=d.heldout_size, metavar="N", help="default %(default)s"
    )
    p.add_argument("--dev", type=int, default=d.dev_size, metavar="N", help="default %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.set_defaults(func=_prepare_text)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    from speechllama.data.manifest import DEFAULT_DURATION_TOLERANCE

    p = sub.add_parser(
        "validate",
        help="check every row of manifests and list all bad rows",
        description="Read every row and report all problems at once, as FILE:LINE: problem "
        "(malformed JSON, missing or mistyped keys, empty text, missing or unreadable audio, "
        "duration far from the file's, duplicate ids), then one summary line per manifest. "
        "Exit code 1 if any row is bad, unless --skip-bad.",
    )
    p.add_argument("manifest", nargs="+", type=Path, metavar="MANIFEST", help="JSONL manifest(s)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="bad rows are reported but do not fail the command (only a manifest with no "
        "valid row does)",
    )
    p.add_argument(
        "--out", type=Path, metavar="FILE", help="write the valid rows here (one manifest only)"
    )
    p.add_argument(
        "--no-audio",
        dest="check_audio",
        action="store_false",
        help="do not open the audio files (fast; skips existence and duration checks)",
    )
    p.add_argument(
        "--duration-tolerance",
        type=float,
        default=DEFAULT_DURATION_TOLERANCE,
        metavar="S",
        help="allowed |duration - file duration| in seconds (default %(default)s)",
    )
    p.add_argument("--max-seconds", type=float, metavar="S", help="reject longer utterances")
    p.set_defaults(func=_validate)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    """``synth`` is built by ``speechllama.data.synth``; imported here, at registration, so that
    ``--help`` lists its options. Without it (or its dependencies) the command still exists and
    says why it cannot run."""
    try:
        from speechllama.data.synth import add_synth_arguments, synth_main
    except ImportError as exc:
        reason = f"synthesis is unavailable ({exc})"
        p = sub.add_parser("synth", help="synthesize speech (unavailable)", description=reason)
        p.set_defaults(func=lambda args: _unavailable(reason))
        return
    p = sub.add_parser(
        "synth",
        help="synthesize speech for a sentence list with many voices",
        description="Read a sentence list (one normalised sentence a line, as written by "
        "prepare-text) with synthetic voices and write OUT/manifest.jsonl plus the audio.",
    )
    add_synth_arguments(p)
    p.set_defaults(func=synth_main)


def _add_relabel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relabel",
        help="replace a manifest's transcripts by a model's greedy output (self-distillation)",
        description="Self-distillation targets for multi-token heads: every row of MANIFEST "
        "gets, as its text, the greedy hypothesis that `speechllama evaluate` wrote for it "
        "(HYPOTHESES: its hypotheses.jsonl or the evaluation folder). The old transcript is "
        "kept as reference_text. Rows without a hypothesis, or whose hypothesis is empty, are "
        "dropped and counted. Train heads on the result with the trunk frozen: verification "
        "accepts a head's guess only when it matches the model's own greedy output.",
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="JSONL manifest")
    p.add_argument(
        "hypotheses", metavar="HYPOTHESES", help="evaluate's hypotheses.jsonl, or its --out folder"
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="manifest to write")
    p.set_defaults(func=_relabel)


def _relabel(args: argparse.Namespace) -> int:
    from speechllama.data.manifest import load_manifest, write_manifest
    from speechllama.data.relabel import default_hypotheses, relabel
    from speechllama.resultlog import read_rows

    path = default_hypotheses(args.hypotheses)
    if not os.path.isfile(path):
        print(f"{_PROG} relabel: {path}: no such hypotheses file", file=sys.stderr)
        return 1
    rows, _torn = read_rows(path)
    utterances = load_manifest(args.manifest, check_audio=False)
    kept, stats = relabel(utterances, rows)
    print(f"{args.out}: {stats.summary()}")
    if not kept:
        print(f"{_PROG} relabel: {path}: no hypothesis matches a row of {args.manifest}",
              file=sys.stderr)  # fmt: skip
        return 1
    write_manifest(kept, args.out, relative=False)
    return 0


def _add_asterisk(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "asterisk",
        help="a locked real-speech test set from Debian's Asterisk English prompts",
        description="Real read sentences (one US-English speaker, 8 kHz, CC-BY-SA-3.0) from "
        "the Debian packages asterisk-core-sounds-en-wav (audio) and asterisk-core-sounds-en "
        "(transcripts), extracted under ROOT (`apt-get download` them, then `dpkg-deb -x` "
        "each into ROOT). Keeps the prompts whose text can be scored as written (at least "
        "--min-words words; no digits, keypad symbols or bracketed notes; at most 30 s) and "
        "writes DIR/manifest.tsv and DIR/manifest.jsonl (audio referenced, not copied).",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="folder with both packages extracted")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--min-words", type=int, default=5, metavar="N", help="default: %(default)s")
    p.set_defaults(func=_asterisk)


def _asterisk(args: argparse.Namespace) -> int:
    from speechllama.data.asterisk import write_tsv
    from speechllama.data.tsv import import_tsv

    if not args.root.is_dir():
        print(f"{_PROG} asterisk: {args.root}: no such folder", file=sys.stderr)
        return 1
    try:
        selection = write_tsv(args.root, args.out / "manifest.tsv", min_words=args.min_words)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{_PROG} asterisk: {exc}", file=sys.stderr)
        return 1
    result = import_tsv(selection.tsv, args.out, name="manifest")
    for problem in result.problems:
        print(f"{_PROG} asterisk: {problem}", file=sys.stderr)
    left_out = ", ".join(f"{n} {why}" for why, n in sorted(selection.dropped.items()))
    print(f"{result.manifests['manifest']}: {result.counts['manifest']} utterances "
          f"(left out: {left_out or 'none'})")  # fmt: skip
    return 1 if result.problems else 0


def _unavailable(reason: str) -> int:
    print(f"{_PROG} synth: error: {reason}", file=sys.stderr)
    return 1


def _import_tsv(args: argparse.Namespace) -> int:
    from speechllama.data.tsv import import_tsv

    if args.name and len(args.tsv) > 1:
        raise ValueError("--name needs exactly one TSV (each TSV makes its own manifests)")
    failed = 0
    for tsv in args.tsv:
        result = import_tsv(tsv, args.out, name=args.name, copy_audio=args.copy_audio)
        for problem in result.problems:
            print(f"{_PROG} import-tsv: {problem}", file=sys.stderr)
        failed += len(result.problems)
        for key, path in result.manifests.items():
            print(f"{path}: {result.counts[key]} utterances")
    if failed:
        print(f"{_PROG} import-tsv: {failed} row(s) skipped", file=sys.stderr)
    return 1 if failed else 0


def _prepare_text(args: argparse.Namespace) -> int:
    from speechllama.data.textprep import TextPrepOptions, prepare_text

    options = TextPrepOptions(
        max_words=args.max_words,
        min_words=args.min_words,
        heldout_size=args.heldout,
        dev_size=args.dev,
        seed=args.seed,
    )
    if options.min_words < 1 or options.max_words < options.min_words:
        raise ValueError(
            f"need 1 <= --min-words <= --max-words, got {options.min_words}, {options.max_words}"
        )
    stats = prepare_text(args.corpus, args.out, exclude_paths=args.exclude, options=options)
    print(
        f"{args.out}: {stats.train} train, {stats.dev} dev, {stats.heldout} heldout sentences "
        f"from {stats.lines} lines ({stats.split} split, {stats.dropped_long} clauses over "
        f"{options.max_words} words dropped, {stats.dropped_short} too short, "
        f"{stats.duplicates} duplicates, {stats.in_test_sets} in test sets)"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from speechllama.data.manifest import check_manifest, write_manifest

    if args.out is not None and len(args.manifest) > 1:
        raise ValueError("--out needs exactly one manifest")
    status = 0
    for manifest in args.manifest:
        check = check_manifest(
            manifest,
            check_audio=args.check_audio,
            duration_tolerance=args.duration_tolerance,
            max_seconds=args.max_seconds,
        )
        for problem in check.problems:
            print(f"{manifest}:{problem.line}: {problem.message}")
        print(
            f"{manifest}: {check.rows} rows, {len(check.utterances)} valid, "
            f"{len(check.problems)} bad, {check.hours:.2f} h valid audio"
        )
        if not check.utterances or (check.problems and not args.skip_bad):
            status = 1
        if args.out is not None and check.utterances:
            count = write_manifest(check.utterances, args.out)
            print(f"{args.out}: {count} valid rows written")
    return status
