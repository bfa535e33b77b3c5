"""``speechllama evaluate MANIFEST --out DIR``: WER and cost of a model on a NeMo manifest.

Writes DIR/hypotheses.jsonl (as utterances finish), DIR/alignments.txt and DIR/summary.json
(with each head's teacher-forced top-1 accuracy, ``head_accuracy``, unless --no-head-accuracy),
and prints a one-line summary. Utterances whose audio fails print one error line each, are left
out of the WER, and make the exit code 1. Bad manifest rows are all listed (MANIFEST:LINE:
problem) and stop the command unless --skip-bad. A killed run resumes when re-run with the same
--out (see ``speechllama.evaluate``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechllama.cli.transcribe import (
    add_decoding_args,
    add_model_args,
    decoding_options,
    setup_torch,
)

_PROG = "speechllama evaluate"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="WER, decoder calls and real-time factor on a manifest",
        description="Transcribe a NeMo JSONL manifest and write hypotheses.jsonl, "
        "alignments.txt and summary.json (WER, decoder calls, RTF) to --out DIR.",
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="NeMo JSONL manifest")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N utterances")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="evaluate the valid rows of a manifest with bad ones (each bad row is still "
        "reported, as MANIFEST:LINE: problem)",
    )
    p.add_argument(
        "--head-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score each head's top-1 accuracy teacher-forced on the references "
        "(summary key head_accuracy; one more untimed model pass) (default: on)",
    )
    add_model_args(p)
    add_decoding_args(p)
    p.set_defaults(func=run)


def _utterances(args: argparse.Namespace) -> list | None:
    """The manifest's valid rows; every bad row is printed (MANIFEST:LINE: problem), and None
    (exit 1) when there are bad rows without --skip-bad, or no valid row at all."""
    from speechllama.data.manifest import check_manifest

    # Audio problems are per-utterance failures later (counted, reported), not bad rows here.
    check = check_manifest(args.manifest, check_audio=False)
    for problem in check.problems:
        print(f"{args.manifest}:{problem.line}: {problem.message}", file=sys.stderr)
    if check.problems and not args.skip_bad:
        print(
            f"{_PROG}: error: {args.manifest}: {len(check.problems)} bad row(s) of {check.rows} "
            "(--skip-bad evaluates the others)",
            file=sys.stderr,
        )
        return None
    if not check.utterances:
        print(f"{_PROG}: error: {args.manifest}: no valid rows", file=sys.stderr)
        return None
    return list(check.utterances)


def run(args: argparse.Namespace) -> int:
    from speechllama.distributed_eval import evaluate_sharded, rank_device
    from speechllama.transcribe import load_model

    setup_torch(args)
    options = decoding_options(args)
    utts = _utterances(args)
    if utts is None:
        return 1
    model = load_model(args.model, device=rank_device(args.device), precision=args.dtype,
                       compile=args.compile, encoder_precision=args.encoder_dtype)  # fmt: skip

    def report(_index: int, result) -> None:
        if result.error is not None:
            print(f"{_PROG}: error: {result.error}", file=sys.stderr, flush=True)

    s = evaluate_sharded(  # the manifest shared among ranks under torchrun
        model,
        utts,
        options=options,
        out_dir=args.out,
        limit=args.limit,
        on_result=report,
        head_accuracy=args.head_accuracy,
    )
    if s is None:
        return 0  # a rank > 0 under torchrun: rank 0 scores the merged results and reports
    if s.get("resumed"):
        print(f"{_PROG}: resumed: {s['resumed']} utterance(s) were already done", file=sys.stderr)
    for skip in s.get("head_accuracy_skipped", ()):
        print(
            f"{_PROG}: note: {skip['audio_filepath']}: not in head_accuracy: {skip['reason']}",
            file=sys.stderr,
        )
    heads = ""
    if "head_accuracy" in s:
        heads = "head acc " + "/".join(f"{100 * a:.1f}" for a in s["head_accuracy"]) + "% | "
        heads += f"CE {s['head_ce'][0]:.3f} | "
    print(
        f"WER {100 * s['wer']:.2f}% (S={s['substitutions']} D={s['deletions']} "
        f"I={s['insertions']} N={s['words']}) on {s['utterances']} utterances | "
        f"{s['calls_per_utt']:.1f} calls/utt, {s['tokens_per_call']:.2f} tokens/call | {heads}"
        f"RTF {s['rtf']:.4f} (encoder {s['encoder_rtf']:.4f}, decoder {s['decoder_rtf']:.4f}) "
        f"| {args.out / 'summary.json'}"
    )
    if s["failed"]:
        print(f"{_PROG}: {s['failed']} utterance(s) failed", file=sys.stderr)
        return 1
    return 0
